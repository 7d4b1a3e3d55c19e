"""The dataset report of an upload (app/report.py): numbers per split and the warnings."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from app.dataset import ZipLimits, inspect_dataset, safe_extract
from app.report import DUPLICATE_DISTANCE, MIN_CLASS_INSTANCES, difference_hash, split_summary
from models.data.masks import encode_rle


def _photo(arr: np.ndarray, path: Path, size: tuple[int, int] | None = None, quality: int = 95) -> Path:
    im = Image.fromarray(arr)
    if size:
        im = im.resize(size, Image.Resampling.BILINEAR)
    im.save(path, quality=quality)
    return path


def test_difference_hash_sees_the_same_photo_through_resizing_and_recompression(tmp_path: Path) -> None:
    from skimage import data

    cat, astronaut = data.chelsea(), data.astronaut()
    a = difference_hash(_photo(cat, tmp_path / "a.jpg"))
    small = difference_hash(_photo(cat, tmp_path / "b.jpg", size=(200, 150), quality=60))
    mirrored = difference_hash(_photo(np.ascontiguousarray(cat[:, ::-1]), tmp_path / "c.jpg"))
    other = difference_hash(_photo(astronaut, tmp_path / "d.png"))
    assert a is not None and small is not None and mirrored is not None and other is not None
    assert (a ^ small).bit_count() <= DUPLICATE_DISTANCE
    assert (a ^ mirrored).bit_count() > 3 * DUPLICATE_DISTANCE and (a ^ other).bit_count() > 3 * DUPLICATE_DISTANCE
    (tmp_path / "e.jpg").write_bytes(b"not an image")
    assert difference_hash(tmp_path / "e.jpg") is None


def test_split_summary_counts_sizes_crowds_and_empty_images() -> None:
    def box(h: int, w: int, side: int) -> dict:
        m = np.zeros((h, w), np.uint8)
        m[:side, :side] = 1
        return encode_rle(m)

    coco = {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 200, "width": 200} for i in (1, 2, 3)],
            "categories": [{"id": 5, "name": "bolt"}, {"id": 9, "name": "nut"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 5, "segmentation": box(200, 200, 10), "iscrowd": 0},  # 100 px
                {"id": 2, "image_id": 1, "category_id": 5, "segmentation": box(200, 200, 50), "iscrowd": 0,
                 "area": 2500},
                {"id": 3, "image_id": 2, "category_id": 9, "segmentation": box(200, 200, 150), "iscrowd": 0},
                {"id": 4, "image_id": 2, "category_id": 9, "segmentation": box(200, 200, 150), "iscrowd": 1}]}
    s = split_summary(coco)
    assert (s["images"], s["instances"], s["crowd_regions"]) == (3, 3, 1)
    assert s["instances_per_class"] == {"bolt": 2, "nut": 1}
    assert s["instances_per_image"] == {"max": 2, "median": 1}
    assert s["size_shares"] == {"small": 0.333, "medium": 0.333, "large": 0.333}
    assert s["images_without_annotations"] == 1


def test_report_of_a_roboflow_export_warns_about_leaks_and_rare_classes(tmp_path: Path, voc_dir: Path) -> None:
    from tests.export_layouts import roboflow_coco_zip

    (tmp_path / "up.zip").write_bytes(roboflow_coco_zip(voc_dir))
    safe_extract(tmp_path / "up.zip", tmp_path / "ds", ZipLimits())
    report = inspect_dataset(tmp_path / "ds").report
    assert list(report["splits"]) == ["train", "val", "test"]
    train = report["splits"]["train"]
    assert train["images"] == 2 and train["instances"] == sum(train["instances_per_class"].values())
    assert set(train["instances_per_class"]) == {"bottle", "chair", "diningtable", "person"}
    codes = {w["code"]: w["message"] for w in report["warnings"]}
    # valid/voc_2 is train/voc_0 at 3/4 size, test/voc_3 is train/voc_1 (mirrored) at 3/4 size
    assert "valid/voc_2.jpg ~ train/voc_0.jpg" in codes["near_duplicates"]
    assert "test/voc_3.jpg ~ train/voc_1.jpg" in codes["near_duplicates"]
    rare = [c for c, n in train["instances_per_class"].items() if n < MIN_CLASS_INSTANCES]
    assert rare and all(repr(c) in codes["rare_class"] for c in rare)


def test_report_warns_about_a_split_without_a_class_and_unlabelled_images(tmp_path: Path, voc_dir: Path) -> None:
    import json

    from tests.service_fixtures import zip_dir

    coco = json.loads((voc_dir / "annotations.json").read_text())
    person = next(c["id"] for c in coco["categories"] if c["name"] == "person")
    val = {**coco, "annotations": [a for a in coco["annotations"] if a["category_id"] != person]}
    train = {**coco, "annotations": [a for a in coco["annotations"] if a["image_id"] != coco["images"][0]["id"]]}
    data = zip_dir(voc_dir, extra={"train.json": json.dumps(train).encode(), "val.json": json.dumps(val).encode()},
                   skip=("annotations.json",))
    (tmp_path / "up.zip").write_bytes(data)
    safe_extract(tmp_path / "up.zip", tmp_path / "ds", ZipLimits())
    report = inspect_dataset(tmp_path / "ds").report
    codes = {w["code"]: w["message"] for w in report["warnings"]}
    assert "the val split has no instance of 'person'" in codes["class_missing_from_split"]
    assert codes["images_without_annotations"].startswith("1 of the train split's 4 images")
    assert report["splits"]["train"]["images_without_annotations"] == 1
    assert "near_duplicates" in codes  # val holds the very same photos
