"""COCOeval wrapper: perfect, wrong-class, degraded and empty predictions on a small synthetic GT."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from models.engine.evaluate import STAT_NAMES, best_f1_score_threshold, evaluate_segm, write_report
from models.errors import DataError

H, W = 200, 240
CATS = [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}, {"id": 1000, "name": "kite"},
        {"id": 42, "name": "ghost"}]  # ghost: no ground truth anywhere


def _rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def _box(y0: int, x0: int, hh: int, ww: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y0 + hh, x0:x0 + ww] = 1
    return m


def _disk(cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


# (image id, category id, mask): small (<32^2), medium and large objects in every image.
OBJECTS = [
    (1, 3, _box(10, 10, 20, 25)),       # small, 500 px
    (1, 17, _disk(100, 100, 30)),       # medium, ~2800 px
    (1, 1000, _box(60, 150, 120, 80)),  # large, 9600 px
    (2, 17, _box(5, 200, 15, 15)),      # small
    (2, 3, _disk(120, 60, 45)),         # medium, ~6360 px
    (2, 1000, _box(20, 80, 110, 110)),  # large
    (3, 3, _box(30, 30, 150, 150)),     # large
]


@pytest.fixture
def gt() -> dict:
    return _make_gt()


def _make_gt() -> dict:
    """3 images; categories 3, 17, 1000 (+ one without GT); RLE, polygon and crowd annotations."""
    anns = []
    for i, (img, cat, m) in enumerate(OBJECTS):
        anns.append({"id": i + 1, "image_id": img, "category_id": cat, "segmentation": _rle(m),
                     "area": int(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(_rle(m))],
                     "iscrowd": 0})
    # A polygon annotation: GT in any COCO format must work.
    anns.append({"id": 100, "image_id": 3, "category_id": 17, "iscrowd": 0, "area": 40.0 * 30.0,
                 "bbox": [190.0, 10.0, 40.0, 30.0],
                 "segmentation": [[190.0, 10.0, 230.0, 10.0, 230.0, 40.0, 190.0, 40.0]]})
    # A crowd region (uncompressed RLE, as COCO stores them): predictions on it are ignored.
    crowd = _box(150, 10, 40, 60)
    anns.append({"id": 101, "image_id": 1, "category_id": 3, "iscrowd": 1, "area": int(crowd.sum()),
                 "bbox": [10.0, 150.0, 60.0, 40.0],
                 "segmentation": {"size": [H, W], "counts": _uncompressed_counts(crowd)}})
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in (1, 2, 3)],
        "annotations": anns,
        "categories": copy.deepcopy(CATS),
    }


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a run of zeros (COCO's uncompressed RLE)."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def _perfect(gt: dict) -> list[dict]:
    """Every non-crowd GT as a prediction (RLE, like the model emits), plus extra keys to ignore."""
    out = []
    for k, a in enumerate(gt["annotations"]):
        if a["iscrowd"]:
            continue
        im = next(i for i in gt["images"] if i["id"] == a["image_id"])
        m = mask_utils.decode(_to_rle(a["segmentation"], im["height"], im["width"]))
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": _rle(m),
                    "score": 0.9 - 0.01 * k, "bbox": a["bbox"], "category_name": "whatever"})
    return out


def _to_rle(seg, h, w):
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    return seg


def test_perfect_predictions_score_one(gt):
    before = copy.deepcopy(gt)
    preds = _perfect(gt)
    preds_before = copy.deepcopy(preds)
    # A prediction on the crowd region matches it and is ignored, not counted as a false positive.
    preds.append({"image_id": 1, "category_id": 3, "segmentation": _rle(_box(150, 10, 40, 60)), "score": 0.99})

    m = evaluate_segm(gt, preds)

    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert m["segm"][key] == pytest.approx(1.0), key
        assert m["class_agnostic"][key] == pytest.approx(1.0), key
    assert m["per_category"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0),
                                 "kite": pytest.approx(1.0), "ghost": None}
    assert m["num_images"] == 3 and m["num_predictions"] == len(preds)
    json.dumps(m)  # JSON-serialisable as promised
    # pycocotools mutates what it is given; the caller's data must come back untouched.
    assert gt == before
    assert preds[:-1] == preds_before


def test_annotation_ids_from_zero_score_like_any_others(gt):
    """Roboflow numbers annotations from 0; COCOeval would read a match to id 0 as no match."""
    zero_based = copy.deepcopy(gt)
    for i, a in enumerate(zero_based["annotations"]):
        a["id"] = i
    m = evaluate_segm(zero_based, _perfect(gt))
    assert m["segm"]["AP"] == pytest.approx(1.0) and m["class_agnostic"]["AP"] == pytest.approx(1.0)
    assert [a["id"] for a in zero_based["annotations"]][0] == 0  # the caller's data is untouched


def test_wrong_categories_fail_segm_but_not_class_agnostic(gt):
    rotate = {3: 17, 17: 1000, 1000: 3}
    preds = [{**p, "category_id": rotate[p["category_id"]]} for p in _perfect(gt)]
    m = evaluate_segm(gt, preds)
    assert m["segm"]["AP"] == pytest.approx(0.0, abs=1e-6)
    assert m["segm"]["AP50"] == pytest.approx(0.0, abs=1e-6)
    assert m["class_agnostic"]["AP"] == pytest.approx(1.0)
    assert m["class_agnostic"]["AP50"] == pytest.approx(1.0)


def test_degraded_predictions_score_between_zero_and_one(gt):
    preds = []
    for p in _perfect(gt):
        m = mask_utils.decode({**p["segmentation"], "counts": p["segmentation"]["counts"].encode()})
        shifted = np.zeros_like(m)
        shifted[4:, 3:] = m[:-4, :-3]  # shift down-right: IoU drops, more for small objects
        preds.append({**p, "segmentation": _rle(shifted)})
    m = evaluate_segm(gt, preds)
    assert 0.0 < m["segm"]["AP"] < 1.0
    assert m["segm"]["AP75"] <= m["segm"]["AP50"]
    assert 0.0 < m["class_agnostic"]["AP"] < 1.0
    for name in ("cat", "dog", "kite"):
        assert 0.0 <= m["per_category"][name] <= 1.0


def test_empty_predictions_give_zero(gt):
    m = evaluate_segm(gt, [])
    assert m["segm"]["AP"] == 0.0 and m["segm"]["AP50"] == 0.0
    assert m["class_agnostic"]["AP"] == 0.0
    assert m["per_category"] == {"cat": 0.0, "dog": 0.0, "kite": 0.0, "ghost": None}
    assert m["num_predictions"] == 0


def test_image_ids_restrict_evaluation(gt):
    preds = [p for p in _perfect(gt) if p["image_id"] == 1]
    preds += [{**p, "category_id": 3 if p["category_id"] != 3 else 17}
              for p in _perfect(gt) if p["image_id"] == 2]  # image 2: all wrong classes
    full = evaluate_segm(gt, preds)
    only1 = evaluate_segm(gt, preds, image_ids=[1])
    assert full["segm"]["AP"] < 1.0
    assert only1["segm"]["AP"] == pytest.approx(1.0)
    assert only1["num_images"] == 1
    assert only1["num_predictions"] == 3  # predictions on other images are left out
    # Image 3 alone: no predictions at all, "kite" has no GT there.
    only3 = evaluate_segm(gt, preds, image_ids=[3])
    assert only3["segm"]["AP"] == 0.0
    assert only3["per_category"]["kite"] is None and only3["per_category"]["cat"] == 0.0


def test_area_ranges_without_ground_truth_are_none(gt):
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] > 96 ** 2 or a["iscrowd"]]
    m = evaluate_segm(gt, _perfect(gt))
    assert m["segm"]["APl"] == pytest.approx(1.0)
    assert m["segm"]["APs"] is None and m["segm"]["APm"] is None
    assert m["class_agnostic"]["APs"] is None


def test_gt_from_path_and_missing_keys(gt, tmp_path):
    del gt["annotations"][0]["area"]  # hand-made files omit area/iscrowd: filled in, not a crash
    del gt["annotations"][1]["iscrowd"]
    gt.pop("info", None)
    path = tmp_path / "val.json"
    path.write_text(json.dumps(gt))
    m = evaluate_segm(path, _perfect_from_file(path))
    assert m["segm"]["AP"] == pytest.approx(1.0)
    m = evaluate_segm(str(path), [])
    assert m["segm"]["AP"] == 0.0


def _perfect_from_file(path):
    gt = json.loads(path.read_text())
    for a in gt["annotations"]:
        a.setdefault("iscrowd", 0)
        a.setdefault("bbox", [0, 0, 0, 0])
    return _perfect(gt)


def test_user_errors_raise_data_error(gt, tmp_path):
    with pytest.raises(DataError, match="not found"):
        evaluate_segm(tmp_path / "nope.json", [])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        evaluate_segm(tmp_path / "bad.json", [])
    with pytest.raises(DataError, match="image ids"):
        evaluate_segm(gt, [], image_ids=[1, 99])
    p = _perfect(gt)[0]
    with pytest.raises(DataError, match="image id 99"):
        evaluate_segm(gt, [{**p, "image_id": 99}])
    with pytest.raises(DataError, match="category id 5"):
        evaluate_segm(gt, [{**p, "category_id": 5}])
    with pytest.raises(DataError, match="score"):
        evaluate_segm(gt, [{k: v for k, v in p.items() if k != "score"}])
    small = _rle(np.ones((10, 10), np.uint8))
    with pytest.raises(DataError, match="does not match"):
        evaluate_segm(gt, [{**p, "segmentation": small}])
    broken = copy.deepcopy(gt)
    broken["annotations"][0]["image_id"] = 77
    with pytest.raises(DataError, match="image id 77"):
        evaluate_segm(broken, [])


def test_predict_path_of_perfect_detections_scores_one(gt):
    """Detections as predict.py turns them into instances (extra keys, polygons) still give AP 1."""
    torch = pytest.importorskip("torch")
    from models.engine.predict import detections_to_instances

    ids, names = tuple(c["id"] for c in CATS), tuple(c["name"] for c in CATS)
    results = []
    for im in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"]]
        masks = torch.stack([torch.from_numpy(mask_utils.decode(_to_rle(a["segmentation"], H, W))).float()
                             for a in anns])
        det = {"masks": masks, "scores": torch.full((len(anns),), 0.8),
               "labels": torch.tensor([ids.index(a["category_id"]) for a in anns])}
        for inst in detections_to_instances(det, (H, W), ids, names, with_polygons=True):
            results.append({"image_id": im["id"], **inst})
    assert evaluate_segm(gt, results)["segm"]["AP"] == pytest.approx(1.0)


def test_write_report_roundtrip(gt, tmp_path):
    m = evaluate_segm(gt, _perfect(gt))
    m["extra"] = {"np": np.float32(0.5), "nan": float("nan")}
    out = tmp_path / "sub" / "metrics.json"
    write_report(m, out)
    back = json.loads(out.read_text())
    assert back["segm"]["AP"] == pytest.approx(1.0)
    assert back["per_category"]["ghost"] is None
    assert back["extra"] == {"np": 0.5, "nan": None}
    assert set(back["segm"]) == set(STAT_NAMES)


def test_max_dets_follows_the_densest_image():
    """150 instances in one image: COCO's 100 would cap recall; the default rises to 150 and says so."""
    h, w = 150, 300
    anns, preds = [], []
    for i in range(150):  # a grid of 2x2-pixel squares, each its own instance
        m = np.zeros((h, w), dtype=np.uint8)
        y, x = 10 * (i // 30), 10 * (i % 30)
        m[y:y + 4, x:x + 4] = 1
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "segmentation": _rle(m), "area": 16,
                     "bbox": [x, y, 4, 4], "iscrowd": 0})
        preds.append({"image_id": 1, "category_id": 1, "segmentation": _rle(m), "score": 1.0 - i / 1000})
    gt = {"images": [{"id": 1, "width": w, "height": h, "file_name": "dense.png"}],
          "categories": [{"id": 1, "name": "nucleus"}], "annotations": anns}
    full = evaluate_segm(gt, preds)
    assert full["max_dets"] == 150 and full["segm"]["AP"] == pytest.approx(1.0)
    capped = evaluate_segm(gt, preds, max_dets=100)
    assert capped["max_dets"] == 100 and capped["segm"]["AP"] < 0.8  # two thirds of the recall at most


def test_best_f1_threshold_keeps_the_predictions_that_agree_best_with_the_ground_truth(gt):
    right = _perfect(gt)  # the 8 non-crowd instances
    for p, score in zip(right, (0.9, 0.89, 0.88, 0.87, 0.86, 0.85, 0.2, 0.15)):
        p["score"] = score
    rotate = {3: 17, 17: 1000, 1000: 3}
    wrong = [{**p, "category_id": rotate[p["category_id"]]} for p in right[:3]]  # right mask, wrong class
    for p, score in zip(wrong, (0.5, 0.45, 0.4)):
        p["score"] = score
    # two wrong ones above the last two right ones: keeping all ten (precision 0.8, recall 1) beats the
    # first six (precision 1, recall 0.75), so the cut goes down to the lowest right one
    two = best_f1_score_threshold(gt, right + wrong[:2])
    assert two["threshold"] == pytest.approx(0.15) and two["instances"] == 8 and two["predictions"] == 10
    assert (two["precision"], two["recall"]) == (pytest.approx(0.8), pytest.approx(1.0))
    assert two["f1"] == pytest.approx(2 * 0.8 / 1.8)
    # a third wrong one tips it: 8/11 precision no longer pays for the last quarter of recall
    three = best_f1_score_threshold(gt, right + wrong)
    assert three["threshold"] == pytest.approx(0.85) and three["precision"] == 1.0 and three["recall"] == 0.75
    # nothing right: no threshold to give
    none = best_f1_score_threshold(gt, wrong)
    assert none["threshold"] is None and none["f1"] == 0.0 and none["predictions"] == 3
    assert best_f1_score_threshold(gt, [])["threshold"] is None
