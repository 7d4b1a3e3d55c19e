"""Roboflow's COCO export: ``train/ valid/ test/`` (any of them), each ``_annotations.coco.json`` + images.

What differs from plain COCO, and is normalised in place on upload (the files are our copy):
- a category that names the dataset (id 0, the supercategory of the real classes) and has no
  annotation: dropped, or the model would learn a class that never occurs;
- ``area`` holds the box's area: recomputed from the mask (COCOeval sorts objects into small /
  medium / large by it).
``valid`` is the validation split; ``test`` is kept aside and evaluated once training ends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.formats import SPLITS
from models.data.masks import segmentation_area  # numpy / pycocotools only: no torch

ANNOTATIONS_NAME = "_annotations.coco.json"


def roboflow_splits(coco_files: list[Path]) -> dict[str, Path] | None:
    """{split: file} when every COCO file is a Roboflow split file (``<split>/_annotations.coco.json``), else None.

    None also when two files claim one split (e.g. two exports side by side): the caller's
    plain-COCO rules then explain what is ambiguous.
    """
    if not coco_files or not all(p.name == ANNOTATIONS_NAME and p.parent.name.lower() in SPLITS for p in coco_files):
        return None
    splits: dict[str, Path] = {}
    for p in coco_files:
        split = SPLITS[p.parent.name.lower()]
        if split in splits:
            return None
        splits[split] = p
    return splits


def dataset_categories(raws: list[dict[str, Any]]) -> set[int]:
    """Ids of the categories to drop: no annotation in any split, and the supercategory of another category."""
    used = {a.get("category_id") for raw in raws for a in raw["annotations"] if isinstance(a, dict)}
    cats = [c for raw in raws for c in raw["categories"] if isinstance(c, dict)]
    supers = {c.get("supercategory") for c in cats}
    return {c["id"] for c in cats if c.get("id") not in used and c.get("name") in supers
            and any(o.get("supercategory") == c.get("name") and o.get("id") != c.get("id") for o in cats)}


def normalise(splits: dict[str, Path], raws: dict[str, dict[str, Any]]) -> list[str]:
    """Make the split files plain COCO (see the module doc): `raws` (each split's parsed file) are changed in
    place and written back to `splits`' paths. Returns the names of the dropped categories."""
    drop = dataset_categories(list(raws.values()))
    dropped = sorted({c["name"] for raw in raws.values() for c in raw["categories"]
                      if isinstance(c, dict) and c.get("id") in drop})
    for split, raw in raws.items():
        raw["categories"] = [c for c in raw["categories"] if not (isinstance(c, dict) and c.get("id") in drop)]
        sizes = {im.get("id"): (im.get("height"), im.get("width")) for im in raw["images"] if isinstance(im, dict)}
        for a in raw["annotations"]:
            if not isinstance(a, dict) or a.get("image_id") not in sizes:
                continue  # the COCO checks report it
            h, w = sizes[a["image_id"]]
            if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
                try:
                    a["area"] = float(segmentation_area(a.get("segmentation"), h, w))
                except (ValueError, TypeError):
                    pass  # a malformed mask: the COCO checks name it
        splits[split].write_text(json.dumps(raw))
    return dropped
