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
