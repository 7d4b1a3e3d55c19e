"""COCO mask AP with pycocotools: overall, per category, and class-agnostic (all categories as one).

The ground truth and the predictions are deep-copied before pycocotools sees them: COCOeval
rewrites GT segmentations in place (polygons become RLE with bytes counts) and loadRes adds
keys to every prediction, which would otherwise corrupt the caller's data.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from models.errors import DataError

STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# The only prediction keys handed to loadRes: with a "bbox" key present it would take its
# box branch and use the box area (not the mask area) to sort predictions into size ranges.
_RESULT_KEYS = ("image_id", "category_id", "segmentation", "score")
_AGNOSTIC_ID = 1


def evaluate_segm(
    gt: dict | str | Path,
    results: list[dict],
    image_ids: list[int] | None = None,
    max_dets: int | None = None,
) -> dict[str, Any]:
    """COCO segm metrics of `results` against the ground truth `gt`.

    gt: a COCO instances dict or the path of its JSON file (polygons, RLE and crowd regions all work).
    results: COCO results list; each dict needs "image_id", "category_id" (the original COCO id),
        "segmentation" (compressed RLE at the image's size) and "score"; other keys are ignored.
    image_ids: evaluate only these images (default: every image of `gt`); predictions on
        other images are left out.
    max_dets: detections per image that count (default: COCO's 100, raised to the largest
        number of ground-truth instances in one evaluated image, so dense data such as nuclei
        is not capped in recall).

    Returns a JSON-serialisable dict::

        {"segm": {AP, AP50, AP75, APs, APm, APl}, "per_category": {name: AP | None},
         "class_agnostic": {AP, ..., APl}, "num_images": int, "num_predictions": int,
         "max_dets": int}

    Values are floats in [0, 1]; None marks a metric without ground truth (COCOeval's -1).
    Raises DataError when the ground truth or a prediction is malformed or inconsistent.
    """
    gt_dict, source = _load_gt(gt)
    ids = _select_images(gt_dict, image_ids, source)
    wanted = set(ids)
    preds = [p for p in _clean_results(results, gt_dict, source) if p["image_id"] in wanted]

    if max_dets is None:
        per_image: dict[int, int] = {}
        for a in gt_dict["annotations"]:
            if a["image_id"] in wanted:
                per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        max_dets = max([100, *per_image.values()])
    segm, ev = _run(gt_dict, preds, ids, max_dets)
    per_category = _per_category(ev, gt_dict["categories"])

    agnostic_gt = dict(gt_dict)
    agnostic_gt["categories"] = [{"id": _AGNOSTIC_ID, "name": "object"}]
    agnostic_gt["annotations"] = [{**a, "category_id": _AGNOSTIC_ID} for a in gt_dict["annotations"]]
    agnostic, _ = _run(agnostic_gt, [{**p, "category_id": _AGNOSTIC_ID} for p in preds], ids, max_dets)

    return {
        "segm": segm,
        "per_category": per_category,
        "class_agnostic": agnostic,
        "num_images": len(ids),
        "num_predictions": len(preds),
        "max_dets": max_dets,
    }


def best_f1_score_threshold(gt: dict | str | Path, results: list[dict], iou: float = 0.5) -> dict[str, Any]:
    """The score threshold at which `results` (scored predictions) best agree with `gt`: the one whose
    kept predictions have the highest F1 of precision and recall, a prediction counting as right when
    COCOeval matches it to a ground-truth instance of its category at mask IoU >= `iou`.

    What a teacher's pseudo masks are cut at (models.uplvp.proposals.self_training): a fixed 0.5 suits
    a confident one-class model and keeps almost nothing of a many-class one whose class scores are
    spread over its classes. Arguments as evaluate_segm's (every image of `gt`, crowd regions ignored).

    Returns {"threshold", "precision", "recall", "f1", "predictions", "instances"}; the threshold is
    None when no prediction is right (F1 is 0 at every threshold).
    """
    gt_dict, source = _load_gt(gt)
    ids = _select_images(gt_dict, None, source)
    preds = _clean_results(results, gt_dict, source)
    max_dets = max([100, *(sum(1 for p in preds if p["image_id"] == i) for i in ids)])
    _, ev = _run(gt_dict, preds, ids, max_dets)
    t = int(np.argmin(np.abs(ev.params.iouThrs - iou)))
    scores, right, instances = [], [], 0
    for e in ev.evalImgs:  # one per (category, area range, image); the first area range is "all"
        if e is None or list(e["aRng"]) != list(ev.params.areaRng[0]):
            continue
        keep = ~np.asarray(e["dtIgnore"][t], dtype=bool)
        scores.extend(np.asarray(e["dtScores"])[keep].tolist())
        right.extend((np.asarray(e["dtMatches"][t])[keep] > 0).tolist())
        instances += int((~np.asarray(e["gtIgnore"], dtype=bool)).sum())
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    hits = np.cumsum(np.asarray(right, dtype=float)[order]) if scores else np.zeros(0)
    precision = hits / np.arange(1, len(hits) + 1)
    recall = hits / max(instances, 1)
    f1 = np.where(hits > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    out: dict[str, Any] = {"threshold": None, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                           "predictions": len(scores), "instances": instances}
    if len(f1) and f1.max() > 0:
        k = int(np.argmax(f1))  # keep the k+1 best-scored predictions
        out.update(threshold=float(np.asarray(scores)[order][k]), precision=float(precision[k]),
                   recall=float(recall[k]), f1=float(f1[k]))
    return out


def write_report(metrics: dict, path: str | Path) -> None:
    """Write `metrics` as indented JSON (numpy numbers become plain numbers, NaN/inf become null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")


# --------------------------------------------------------------------------- internals


def _load_gt(gt: dict | str | Path) -> tuple[dict, str]:
    """Validated, normalised deep copy of the ground truth and a name for error messages."""
    if isinstance(gt, dict):
        source, data = "ground truth", gt
    else:
        path = Path(gt)
        source = str(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: ground-truth annotation file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read ground truth ({exc})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: ground truth is not a COCO object (expected a JSON object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{source}: missing or invalid '{key}' list")

    data = copy.deepcopy(data)
    # Only loadRes/info() read these; present so any COCO-API call works on the copy.
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    try:
        images = {int(im["id"]): im for im in data["images"]}
        cat_ids = {int(c["id"]) for c in data["categories"]}
        for c in data["categories"]:
            c.setdefault("name", str(c["id"]))
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{source}: every image and category needs an integer 'id'") from None
    for im in images.values():
        if "height" not in im or "width" not in im:
            raise DataError(f"{source}: image {im['id']} has no 'height'/'width'")
    for i, a in enumerate(data["annotations"]):
        ann_id = a.get("id", f"#{i}")
        if a.get("image_id") not in images:
            raise DataError(f"{source}: annotation {ann_id} points at image id {a.get('image_id')!r}, "
                            "which is not in 'images'")
        if a.get("category_id") not in cat_ids:
            raise DataError(f"{source}: annotation {ann_id} has category id {a.get('category_id')!r}, "
                            "which is not in 'categories'")
        if "segmentation" not in a:
            raise DataError(f"{source}: annotation {ann_id} has no 'segmentation'")
        # COCOeval reads these keys unconditionally; hand-made files often leave them out. Its ids are
        # renumbered from 1 on this copy: COCOeval records a match as the matched ground truth's id and
        # reads 0 as "no match", so an annotation with id 0 (Roboflow's exports start there) would turn
        # every detection of it into a false positive (cocodataset/cocoapi; cvat-ai/cvat#748).
        a["id"] = i + 1
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            im = images[a["image_id"]]
            try:
                a["area"] = float(mask_utils.area(_to_rle(a["segmentation"], im["height"], im["width"])))
            except Exception as exc:  # pycocotools raises bare TypeError/ValueError on bad input
                raise DataError(f"{source}: annotation {ann_id} has an unreadable segmentation ({exc})") from None
    return data, source


def _to_rle(segmentation: Any, height: int, width: int) -> dict:
    """Any COCO segmentation -> compressed RLE (the same conversion COCO.annToRLE does)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def _select_images(gt: dict, image_ids: list[int] | None, source: str) -> list[int]:
    """The image ids to evaluate, unique and in the given order; unknown ids are an error."""
    known = [int(im["id"]) for im in gt["images"]]
    if image_ids is None:
        ids = list(dict.fromkeys(known))
    else:
        ids = list(dict.fromkeys(int(i) for i in image_ids))
        missing = sorted(set(ids) - set(known))
        if missing:
            raise DataError(f"{source}: image ids {missing[:5]} asked for evaluation are not in 'images'")
    if not ids:
        raise DataError(f"{source}: no images to evaluate")
    return ids


def _clean_results(results: list[dict], gt: dict, source: str) -> list[dict]:
    """Predictions reduced to the keys COCOeval needs, checked against the ground truth."""
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in gt["images"]}
    cat_ids = {int(c["id"]) for c in gt["categories"]}
    clean = []
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise DataError(f"results[{i}]: expected a dict, got {type(r).__name__}")
        for key in _RESULT_KEYS:
            if key not in r:
                raise DataError(f"results[{i}]: missing '{key}'")
        image_id, cat_id, seg = int(r["image_id"]), int(r["category_id"]), r["segmentation"]
        if image_id not in sizes:
            raise DataError(f"results[{i}]: image id {image_id} is not an image of {source}")
        if cat_id not in cat_ids:
            raise DataError(f"results[{i}]: category id {cat_id} is not a category of {source} "
                            "(results must use the original COCO category ids)")
        if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg or isinstance(seg["counts"], list):
            raise DataError(f"results[{i}]: 'segmentation' must be a compressed RLE {{'size', 'counts'}}")
        if tuple(int(s) for s in seg["size"]) != sizes[image_id]:
            raise DataError(f"results[{i}]: mask size {list(seg['size'])} does not match image {image_id} "
                            f"({list(sizes[image_id])})")
        clean.append({"image_id": image_id, "category_id": cat_id,
                      "segmentation": copy.deepcopy(seg), "score": float(r["score"])})
    return clean


def _run(gt: dict, preds: list[dict], image_ids: list[int], max_dets: int = 100) -> tuple[dict[str, float | None], COCOeval]:
    """One COCOeval over `image_ids` with at most `max_dets` detections per image
    -> ({AP..APl}, the evaluator for per-category precision)."""
    gt = copy.deepcopy(gt)  # COCOeval converts GT segmentations in place
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress unconditionally
        gt_coco = COCO()
        gt_coco.dataset = gt
        gt_coco.createIndex()
        if preds:
            dt_coco = gt_coco.loadRes(copy.deepcopy(preds))
        else:
            # loadRes rejects []; an empty result set evaluates fine and gives 0 where GT exists.
            dt_coco = COCO()
            dt_coco.dataset = {"images": list(gt["images"]), "categories": copy.deepcopy(gt["categories"]),
                               "annotations": []}
            dt_coco.createIndex()
        ev = COCOeval(gt_coco, dt_coco, iouType="segm")
        ev.params.imgIds = list(image_ids)
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    return _summary(ev), ev


def _summary(ev: COCOeval) -> dict[str, float | None]:
    """AP, AP50, AP75, APs, APm, APl at the largest maxDets, from COCOeval's precision table.

    COCOeval.summarize() is not used: its first AP is computed at a hard-coded maxDets of 100
    (and fails when 100 is not among the maxDets), which would cap dense data again.
    """
    precision = ev.eval["precision"]  # [T IoUs, R recalls, K categories, A areas, M maxDets]
    iou = ev.params.iouThrs
    areas = {name: i for i, name in enumerate(ev.params.areaRngLbl)}  # all, small, medium, large

    def ap(area: str = "all", iou_thr: float | None = None) -> float:
        p = precision[:, :, :, areas[area], -1]
        if iou_thr is not None:
            p = p[np.where(np.isclose(iou, iou_thr))[0]]
        return float(np.mean(p[p > -1])) if (p > -1).any() else -1.0

    values = (ap(), ap(iou_thr=0.5), ap(iou_thr=0.75), ap("small"), ap("medium"), ap("large"))
    return {name: _metric(v) for name, v in zip(STAT_NAMES, values)}


def _per_category(ev: COCOeval, categories: list[dict]) -> dict[str, float | None]:
    """AP (IoU .50:.95, area all, the largest maxDets) of each category, keyed by name."""
    names = {int(c["id"]): str(c["name"]) for c in categories}
    counts: dict[str, int] = {}
    for n in names.values():
        counts[n] = counts.get(n, 0) + 1
    precision = ev.eval["precision"]  # [T IoUs, R recalls, K categories, A areas, M maxDets]
    out: dict[str, float | None] = {}
    for k, cat_id in enumerate(ev.params.catIds):
        name = names[int(cat_id)]
        if counts[name] > 1:  # keep every category visible when two share a name
            name = f"{name} (id {cat_id})"
        p = precision[:, :, k, 0, -1]
        out[name] = _metric(float(np.mean(p[p > -1]))) if (p > -1).any() else None
    return out


def _metric(v: float) -> float | None:
    """COCOeval's -1 ("no ground truth") -> None; everything else a plain float."""
    v = float(v)
    return None if v < 0 or math.isnan(v) else v


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj
