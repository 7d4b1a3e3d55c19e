"""The `self` engine's cut, calibrated on held-out labelled images (a stand-in teacher whose masks are known)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from models.uplvp.proposals import self_training
from models.uplvp.proposals.self_training import CALIBRATION_FLOOR, FIXED_MIN_SCORE, calibrate_min_score

CATEGORIES = [{"id": 5, "name": "kudzu_bug"}, {"id": 9, "name": "brown_spot"}]


def _rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def _box(h: int, w: int, y: int, x: int, s: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y:y + s, x:x + s] = 1
    return m


@pytest.fixture
def val(tmp_path: Path) -> tuple[Path, Path, dict]:
    """Three photos of distinct sizes, two objects each; returns (annotations, folder, size -> objects)."""
    images, anns, objects = [], [], {}
    for i, (h, w) in enumerate([(60, 80), (64, 96), (72, 72)]):
        Image.new("RGB", (w, h), (i * 40, 90, 120)).save(tmp_path / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
        objects[(w, h)] = []
        for j, cat in enumerate((5, 9)):
            m = _box(h, w, 5 + 25 * j, 5 + 30 * j, 20)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "segmentation": _rle(m),
                         "area": int(m.sum()), "bbox": [5.0 + 30 * j, 5.0 + 25 * j, 20.0, 20.0], "iscrowd": 0})
            objects[(w, h)].append((cat, m))
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return ann, tmp_path, objects


def _teacher(monkeypatch, objects: dict, score_of: dict, wrong_class_score: float = 0.0) -> None:
    """Replace the checkpoint's Predictor by one that finds every object of a photo (recognised by its
    size) with `score_of[category]`, plus, when `wrong_class_score`, each object twice more under the other class."""

    class Teacher:
        category_ids = [5, 9]
        category_names = ["kudzu_bug", "brown_spot"]

        def __init__(self, checkpoint, num_threads=0, device="cpu"):
            pass

        def predict_images(self, images, score_threshold=0.3):
            out = []
            for im in images:
                found = []
                for cat, m in objects[im.size]:
                    found.append((cat, m, score_of[cat]))
                    if wrong_class_score:
                        found += [(14 - cat, m, wrong_class_score)] * 2  # 5 <-> 9
                out.append([{"category_id": cat, "category_name": "", "segmentation": _rle(m),
                             "area": int(m.sum()), "score": s} for cat, m, s in found if s >= score_threshold])
            return out

    monkeypatch.setattr("models.engine.inference.Predictor", Teacher)


def test_a_teacher_right_at_low_scores_is_cut_below_the_fixed_one(val, monkeypatch):
    ann, folder, objects = val
    # a many-class teacher: right about every object, but only 0.3 / 0.2 sure of its class
    _teacher(monkeypatch, objects, {5: 0.3, 9: 0.2})
    cut = calibrate_min_score("teacher.pt", ann, folder)
    assert cut["calibrated"] and cut["min_score"] == pytest.approx(0.2) and FIXED_MIN_SCORE > 0.2
    assert (cut["precision"], cut["recall"], cut["images"], cut["instances"]) == (1.0, 1.0, 3, 6)


def test_the_cut_leaves_out_what_the_teacher_gets_wrong(val, monkeypatch):
    ann, folder, objects = val
    # each object also proposed twice under the wrong class at 0.25, between the right 0.3 and 0.2: the cut keeps
    # the 0.3 ones alone (precision 1, recall 0.5: F1 0.67, against 6 right of 18 for all of them: F1 0.5)
    _teacher(monkeypatch, objects, {5: 0.3, 9: 0.2}, wrong_class_score=0.25)
    cut = calibrate_min_score("teacher.pt", ann, folder)
    assert cut["min_score"] == pytest.approx(0.3) and cut["precision"] == 1.0 and cut["recall"] == 0.5


def test_a_teacher_never_right_falls_back_to_the_fixed_cut(val, monkeypatch):
    ann, folder, objects = val
    _teacher(monkeypatch, objects, {5: CALIBRATION_FLOOR / 2, 9: CALIBRATION_FLOOR / 2})  # all below the floor
    assert calibrate_min_score("teacher.pt", ann, folder) == {
        "min_score": FIXED_MIN_SCORE, "calibrated": False, "images": 3, "precision": 0.0, "recall": 0.0,
        "f1": 0.0, "predictions": 0, "instances": 6}
    assert self_training.CALIBRATION_IMAGES >= 3
