"""Torch-free dataset checks: zip safety, layout discovery, COCO schema (no Redis needed)."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import pytest

from app.dataset import DatasetError, ZipLimits, inspect_dataset, safe_extract
from tests.service_fixtures import zip_dir


def _zip(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "up.zip"
    p.write_bytes(data)
    return p


def test_good_dataset(tmp_path: Path, voc_zip: bytes) -> None:
    safe_extract(_zip(tmp_path, voc_zip), tmp_path / "ds", ZipLimits())
    layout = inspect_dataset(tmp_path / "ds")
    assert (layout.train_ann, layout.train_images, layout.val_ann) == ("annotations.json", "images", None)
    assert layout.num_images == 4 and layout.categories == ["bottle", "chair", "diningtable", "person"]


def test_train_and_val_files_make_a_split(tmp_path: Path, voc_dir: Path) -> None:
    coco = (voc_dir / "annotations.json").read_bytes()
    data = zip_dir(voc_dir, extra={"ann/train.json": coco, "ann/val.json": coco}, skip=("annotations.json",))
    safe_extract(_zip(tmp_path, data), tmp_path / "ds", ZipLimits())
    layout = inspect_dataset(tmp_path / "ds")
    assert (layout.train_ann, layout.val_ann, layout.train_images) == ("ann/train.json", "ann/val.json", "images")


def test_three_coco_files_are_ambiguous(tmp_path: Path, voc_dir: Path) -> None:
    coco = (voc_dir / "annotations.json").read_bytes()
    data = zip_dir(voc_dir, extra={"b.json": coco, "c.json": coco})
    safe_extract(_zip(tmp_path, data), tmp_path / "ds", ZipLimits())
    with pytest.raises(DatasetError) as e:
        inspect_dataset(tmp_path / "ds")
    assert e.value.code == "ambiguous_annotations" and "*train*.json" in e.value.message


def test_symlink_member_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link.jpg")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DatasetError) as e:
        safe_extract(_zip(tmp_path, buf.getvalue()), tmp_path / "ds", ZipLimits())
    assert e.value.code == "unsafe_zip" and "symbolic link" in e.value.problems[0]["problem"]
    assert not (tmp_path / "ds").exists()


def test_absolute_path_and_bomb_ratio_and_caps(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("/abs.txt", "x")
        zf.writestr("zeros.bin", b"\0" * 2_000_000)
    up = _zip(tmp_path, buf.getvalue())
    with pytest.raises(DatasetError) as e:
        safe_extract(up, tmp_path / "a", ZipLimits())
    assert e.value.code == "unsafe_zip"
    assert [p["file"] for p in e.value.problems] == ["/abs.txt", "zeros.bin"]
    with pytest.raises(DatasetError) as e:
        safe_extract(up, tmp_path / "b", ZipLimits(max_members=1))
    assert e.value.code == "zip_too_large" and e.value.status == 413
    with pytest.raises(DatasetError) as e:
        safe_extract(up, tmp_path / "c", ZipLimits(max_total_bytes=1000))
    assert e.value.code == "zip_too_large"


def test_schema_problems_are_all_reported(tmp_path: Path, voc_dir: Path) -> None:
    coco = json.loads((voc_dir / "annotations.json").read_text())
    coco["annotations"][0]["category_id"] = 999
    coco["annotations"][1]["image_id"] = 77
    del coco["annotations"][2]["segmentation"]
    data = zip_dir(voc_dir, extra={"annotations.json": json.dumps(coco).encode()}, skip=("annotations.json",))
    safe_extract(_zip(tmp_path, data), tmp_path / "ds", ZipLimits())
    with pytest.raises(DatasetError) as e:
        inspect_dataset(tmp_path / "ds")
    problems = [p["problem"] for p in e.value.problems]
    assert e.value.code == "invalid_coco" and len(problems) == 3
    assert "category_id 999" in problems[0] and "image id 77" in problems[1] and "no 'segmentation'" in problems[2]


# --------------------------------------------------------------------------- export layouts


def _inspect(tmp_path: Path, data: bytes):
    tmp_path.mkdir(parents=True, exist_ok=True)
    safe_extract(_zip(tmp_path, data), tmp_path / "ds", ZipLimits())
    return inspect_dataset(tmp_path / "ds")


def test_roboflow_coco_export_is_taken_as_it_is(tmp_path: Path, voc_dir: Path) -> None:
    from models.data.masks import segmentation_area
    from tests.export_layouts import DATASET_NAME, roboflow_coco_zip

    layout = _inspect(tmp_path, roboflow_coco_zip(voc_dir))
    assert layout.format == "roboflow"
    assert (layout.train_ann, layout.train_images) == ("train/_annotations.coco.json", "train")
    assert (layout.val_ann, layout.val_images) == ("valid/_annotations.coco.json", "valid")
    assert (layout.test_ann, layout.test_images) == ("test/_annotations.coco.json", "test")
    assert layout.num_images == 2 and DATASET_NAME not in layout.categories
    assert layout.categories == ["bottle", "chair", "diningtable", "person"]
    assert any(DATASET_NAME in n for n in layout.notes)
    for split in ("train", "valid", "test"):
        raw = json.loads((tmp_path / "ds" / split / "_annotations.coco.json").read_text())
        assert [c["name"] for c in raw["categories"]] == layout.categories  # every split: the same classes
        sizes = {im["id"]: (im["height"], im["width"]) for im in raw["images"]}
        for a in raw["annotations"]:
            assert a["area"] == segmentation_area(a["segmentation"], *sizes[a["image_id"]])
        assert any(a["area"] < a["bbox"][2] * a["bbox"][3] for a in raw["annotations"])  # not the box's area


def test_roboflow_export_needs_its_train_split(tmp_path: Path, voc_dir: Path) -> None:
    from tests.export_layouts import roboflow_coco_zip

    with pytest.raises(DatasetError) as e:
        _inspect(tmp_path, roboflow_coco_zip(voc_dir, splits=("valid", "test")))
    assert e.value.code == "no_train_split" and "valid/" in e.value.message and "test/" in e.value.message
    layout = _inspect(tmp_path / "t", roboflow_coco_zip(voc_dir, splits=("train",)))
    assert (layout.format, layout.val_ann, layout.test_ann) == ("roboflow", None, None)


def test_named_test_file_is_a_test_split(tmp_path: Path, voc_dir: Path) -> None:
    coco = (voc_dir / "annotations.json").read_bytes()
    data = zip_dir(voc_dir, extra={"ann/train.json": coco, "ann/val.json": coco, "ann/test.json": coco},
                   skip=("annotations.json",))
    layout = _inspect(tmp_path, data)
    assert (layout.train_ann, layout.val_ann, layout.test_ann) == ("ann/train.json", "ann/val.json", "ann/test.json")


def test_crowd_rle_from_cvat_is_accepted(tmp_path: Path, voc_dir: Path) -> None:
    """CVAT exports crowd regions (iscrowd=1) as uncompressed RLE: they must keep working."""
    coco = json.loads((voc_dir / "annotations.json").read_text())
    im = coco["images"][0]
    h, w = im["height"], im["width"]
    counts = [w * 10, w * 5, h * w - w * 15]  # column-major runs: background, a band, background
    coco["annotations"].append({"id": 999, "image_id": im["id"], "category_id": coco["categories"][0]["id"],
                                "segmentation": {"size": [h, w], "counts": counts}, "iscrowd": 1,
                                "bbox": [0, 0, 1, 1], "area": w * 5})
    data = zip_dir(voc_dir, extra={"annotations.json": json.dumps(coco).encode()}, skip=("annotations.json",))
    layout = _inspect(tmp_path, data)
    assert layout.num_annotations == len(coco["annotations"])


def test_yolo_segmentation_layout_is_converted(tmp_path: Path, voc_dir: Path) -> None:
    from tests.export_layouts import yolo_seg_files, yolo_seg_zip

    layout = _inspect(tmp_path, yolo_seg_zip(voc_dir))
    assert layout.format == "yolo" and layout.categories == ["bottle", "chair", "diningtable", "person"]
    assert (layout.train_ann, layout.val_ann, layout.test_ann) == ("uplvp_coco/train.json", "uplvp_coco/val.json",
                                                                     "uplvp_coco/test.json")
    assert layout.num_images == 2 and layout.train_images == "."
    raw = json.loads((tmp_path / "ds" / layout.train_ann).read_text())
    src = json.loads((voc_dir / "annotations.json").read_text())
    voc0 = next(im for im in src["images"] if im["file_name"].endswith("voc_0.jpg"))
    ours = next(im for im in raw["images"] if im["file_name"] == "train/images/voc_0.jpg")
    assert (ours["width"], ours["height"]) == (voc0["width"], voc0["height"])
    label = yolo_seg_files(voc_dir)["train/labels/voc_0.txt"].decode().splitlines()
    anns = [a for a in raw["annotations"] if a["image_id"] == ours["id"]]
    assert len(anns) == len(label) > 5
    first = [float(v) for v in label[0].split()]
    assert anns[0]["category_id"] == int(first[0]) + 1  # class ids 0.. -> category ids 1..
    assert anns[0]["segmentation"][0][:2] == pytest.approx([first[1] * ours["width"], first[2] * ours["height"]])
    assert 0 < anns[0]["area"] <= anns[0]["bbox"][2] * anns[0]["bbox"][3] + 1


YAML_OK = b"train: ../train/images\nval: ../valid/images\nnames: [bottle, chair, diningtable, person]\n"


@pytest.mark.parametrize("change, code, mentions", [
    ({"train/labels/voc_0.txt": b"0 0.1 0.1 0.5 0.1 0.5\n"}, "invalid_yolo", "line 1: 5 coordinates, an odd number"),
    ({"train/labels/voc_0.txt": b"0 0.1 0.1 0.5 0.1 0.5 0.5\n7 0.1 0.1 0.5 0.1 0.5 0.5\n"}, "invalid_yolo",
     "line 2: class id 7 is out of range"),
    ({"train/labels/voc_0.txt": b"1 0.1 0.1 1.5 0.1 0.5 0.5\n"}, "invalid_yolo", "line 1: coordinate 1.5 is outside [0, 1]"),
    ({"train/labels/voc_0.txt": b"1 0.5 0.5 0.2 0.2\n"}, "invalid_yolo", "detection box"),
    ({"train/labels/voc_0.txt": b"1 0.1 0.1 0.5 0.5 0.2 0.2\n0 0.1 0.1\n"}, "invalid_yolo", "at least 3 points"),
    ({"train/labels/ghost.txt": b"0 0.1 0.1 0.5 0.1 0.5 0.5\n"}, "invalid_yolo", "label file without an image"),
    ({"data.yaml": b"path: /srv/data\ntrain: /etc/images\nnames: [a]\n"}, "yolo_path_outside", "outside the zip"),
    ({"data.yaml": b"train: ../../outside/images\nnames: [a]\n"}, "yolo_path_outside", "outside the zip"),
    ({"data.yaml": b"train: train/images\nnames: {0: a, 2: b}\n"}, "invalid_yolo", "'names' ids must be 0..1"),
    ({"data.yaml": b"train: train/nowhere\nnames: [a]\n"}, "invalid_yolo", "is not in the zip"),
])
def test_yolo_conversion_problems(tmp_path: Path, voc_dir: Path, change: dict, code: str, mentions: str) -> None:
    from tests.export_layouts import yolo_seg_zip

    with pytest.raises(DatasetError) as e:
        _inspect(tmp_path, yolo_seg_zip(voc_dir, {"data.yaml": YAML_OK, **change}))
    assert e.value.code == code, e.value.problems
    assert mentions in e.value.message, e.value.message
    if "labels/" in next(iter(change)):
        assert e.value.problems[0]["file"] == next(iter(change))  # the label file is named


def test_yolo_problems_are_all_reported(tmp_path: Path, voc_dir: Path) -> None:
    from tests.export_layouts import yolo_seg_zip

    bad = {"train/labels/voc_0.txt": b"0 0.1 0.1 0.5\n9 0.1 0.1 0.5 0.1 0.5 0.5\n",
           "valid/labels/voc_2.txt": b"0 0.1 -0.2 0.5 0.1 0.5 0.5\n"}
    with pytest.raises(DatasetError) as e:
        _inspect(tmp_path, yolo_seg_zip(voc_dir, bad))
    found = [(p["file"], p["problem"].split(":")[0]) for p in e.value.problems]
    assert found == [("train/labels/voc_0.txt", "line 1"), ("train/labels/voc_0.txt", "line 2"),
                     ("valid/labels/voc_2.txt", "line 1")]
    assert "(and 2 more problem(s)" in e.value.message


def test_yolo_path_of_the_exporters_machine_is_ignored(tmp_path: Path, voc_dir: Path) -> None:
    """Ultralytics' own YAMLs say where the dataset lived (``path: ../datasets/x``): the zip is the dataset."""
    from tests.export_layouts import yolo_seg_zip

    yaml_text = b"path: ../datasets/voc\ntrain: train/images\nval: valid/images\nnames: [bottle, chair, diningtable, person]\n"
    layout = _inspect(tmp_path, yolo_seg_zip(voc_dir, {"data.yaml": yaml_text}))
    assert layout.num_images == 2 and layout.val_ann is not None and layout.test_ann is None
    assert any("ignored data.yaml's 'path: ../datasets/voc'" in n for n in layout.notes)


def test_yolo_image_without_label_is_a_photo_without_objects(tmp_path: Path, voc_dir: Path) -> None:
    from tests.export_layouts import yolo_seg_zip

    layout = _inspect(tmp_path, yolo_seg_zip(voc_dir, {"train/labels/voc_1.txt": None}))
    raw = json.loads((tmp_path / "ds" / layout.train_ann).read_text())
    assert len(raw["images"]) == 2 and {a["image_id"] for a in raw["annotations"]} == {1}
