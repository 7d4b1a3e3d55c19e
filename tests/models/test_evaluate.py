import numpy as np
import pytest
import torch

from models.evaluate import evaluate_segm
from models.masks import encode_rle
from models.predict import detections_to_instances


def _gt():
    """3 images, categories with non-contiguous ids, masks of several sizes, one crowd region."""
    images, anns = [], []
    rng = np.random.default_rng(0)
    for i in range(3):
        images.append({"id": 10 + i, "file_name": f"{i}.jpg", "height": 120, "width": 160})
        for j, (cat, size) in enumerate([(3, 12), (17, 30), (1000, 60)]):
            m = np.zeros((120, 160), np.uint8)
            y, x = rng.integers(0, 120 - size), rng.integers(0, 160 - size)
            m[y : y + size, x : x + size] = 1
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": cat, "segmentation": encode_rle(m),
                         "area": int(m.sum()), "bbox": [float(x), float(y), float(size), float(size)], "iscrowd": 0})
    crowd = np.zeros((120, 160), np.uint8)
    crowd[100:120, 0:40] = 1
    anns.append({"id": 99, "image_id": 10, "category_id": 17, "segmentation": encode_rle(crowd), "area": 800,
                 "bbox": [0.0, 100.0, 40.0, 20.0], "iscrowd": 1})
    cats = [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}, {"id": 1000, "name": "yak"},
            {"id": 5, "name": "unused"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _as_results(gt, category=None):
    return [{"image_id": a["image_id"], "category_id": category or a["category_id"], "segmentation": a["segmentation"],
             "score": 0.9} for a in gt["annotations"] if not a["iscrowd"]]


def test_ground_truth_as_predictions_scores_one():
    gt = _gt()
    m = evaluate_segm(gt, _as_results(gt))
    for k in ("AP", "AP50", "AP75"):
        assert m["segm"][k] == pytest.approx(1.0)
        assert m["class_agnostic"][k] == pytest.approx(1.0)
    assert m["per_category"]["cat"] == pytest.approx(1.0)
    assert m["per_category"]["unused"] is None
    assert m["num_images"] == 3


def test_wrong_categories_score_zero_but_agnostic_one():
    gt = _gt()
    res = [{**r, "category_id": {3: 17, 17: 1000, 1000: 3}[r["category_id"]]} for r in _as_results(gt)]
    m = evaluate_segm(gt, res)
    assert m["segm"]["AP"] == pytest.approx(0.0)
    assert m["class_agnostic"]["AP"] == pytest.approx(1.0)


def test_imperfect_and_empty_predictions():
    gt = _gt()
    res = []
    for r in _as_results(gt):
        from models.masks import decode_rle

        m = decode_rle(r["segmentation"])
        res.append({**r, "segmentation": encode_rle(np.roll(m, 4, axis=1))})
    m = evaluate_segm(gt, res)
    assert 0.0 < m["segm"]["AP"] < 1.0
    empty = evaluate_segm(gt, [])
    assert empty["segm"]["AP"] == 0.0 and empty["class_agnostic"]["AP50"] == 0.0


def test_image_ids_restrict_evaluation():
    gt = _gt()
    res = [r for r in _as_results(gt) if r["image_id"] == 10]
    assert evaluate_segm(gt, res, image_ids=[10])["segm"]["AP"] == pytest.approx(1.0)
    assert evaluate_segm(gt, res)["segm"]["AP"] < 0.5


def test_predict_path_of_perfect_detections_scores_one():
    """Detections at a lower resolution, resized and thresholded by predict.py, still give AP 1."""
    gt = _gt()
    ids, names = (3, 17, 1000, 5), ("cat", "dog", "yak", "unused")
    results = []
    for im in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"]]
        from models.masks import decode_rle

        masks = torch.stack([torch.from_numpy(decode_rle(a["segmentation"])).float() for a in anns])
        det = {"masks": masks, "scores": torch.full((len(anns),), 0.8),
               "labels": torch.tensor([ids.index(a["category_id"]) for a in anns])}
        for inst in detections_to_instances(det, (120, 160), ids, names, with_polygons=True):
            assert inst["polygons"] and inst["area"] > 0
            results.append({"image_id": im["id"], **inst})
    assert evaluate_segm(gt, results)["segm"]["AP"] == pytest.approx(1.0)
