"""COCO mask AP with pycocotools: overall, per category, and class-agnostic (all categories as one)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from models.errors import DataError

_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _coco_from_dict(d: dict) -> COCO:
    coco = COCO()
    data = dict(d)
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _none_if_missing(v: float) -> float | None:
    return None if v < 0 else float(v)


def _run(gt: dict, results: list[dict], image_ids: list[int]) -> tuple[dict, COCOeval | None]:
    """One COCOeval over `image_ids`; zeros when there are no predictions (loadRes rejects [])."""
    gt_coco = _coco_from_dict(gt)
    if not results:
        return {k: 0.0 for k in _STAT_NAMES}, None
    with contextlib.redirect_stdout(io.StringIO()):
        dt_coco = gt_coco.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt_coco, dt_coco, iouType="segm")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: _none_if_missing(v) for k, v in zip(_STAT_NAMES, ev.stats[:6])}, ev


def evaluate_segm(gt: dict | str | Path, results: list[dict], image_ids: list[int] | None = None) -> dict[str, Any]:
    """COCO segm metrics of `results` (COCO results list with RLE segmentations) against `gt`.

    Returns {"segm": {AP, AP50, AP75, APs, APm, APl}, "per_category": {name: AP | None},
    "class_agnostic": {...same keys...}, "num_images", "num_predictions"}; None marks a
    metric with no ground truth (COCOeval's -1).
    """
    if not isinstance(gt, dict):
        path = Path(gt)
        try:
            gt = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read ground truth ({exc})") from None
    ids = image_ids if image_ids is not None else [im["id"] for im in gt["images"]]
    wanted = set(ids)
    results = [r for r in results if r["image_id"] in wanted]
    segm, ev = _run(gt, results, ids)

    per_category: dict[str, float | None] = {}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    if ev is not None:
        precision = ev.eval["precision"]  # [T, R, K, A, M]
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            per_category[names[cat_id]] = float(np.mean(p[p > -1])) if (p > -1).any() else None
    else:
        has_gt = {a["category_id"] for a in gt["annotations"] if a["image_id"] in wanted}
        per_category = {n: (0.0 if cid in has_gt else None) for cid, n in names.items()}

    agnostic_gt = dict(gt)
    agnostic_gt["categories"] = [{"id": 1, "name": "object"}]
    agnostic_gt["annotations"] = [{**a, "category_id": 1} for a in gt["annotations"]]
    agnostic, _ = _run(agnostic_gt, [{**r, "category_id": 1} for r in results], ids)
    return {"segm": segm, "per_category": per_category, "class_agnostic": agnostic,
            "num_images": len(ids), "num_predictions": len(results)}


def write_report(metrics: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2))
