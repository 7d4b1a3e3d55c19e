"""The dataset report: what an upload holds and what looks wrong with it, before any training.

`POST /finetune` answers with it (inside the 202) and the job keeps it (``dataset.report``), so a
user sees at once that a class has three examples or that the test photos are the training photos
resized: the two commonest reasons a first model disappoints in the low-data regime.

Per split: images, instances, instances per class, the largest and median instances per image,
the small / medium / large shares (COCO's thresholds on the mask's area: 32² and 96² pixels),
images without annotations. Warnings (each {code, message}): a class with fewer than
MIN_CLASS_INSTANCES training instances, a split without some class, and near-duplicate images
across train and val/test (a difference hash of each image, compared with a Hamming distance).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from PIL import Image

from models.data.masks import segmentation_area  # numpy / pycocotools only: no torch

SMALL_AREA, MEDIUM_AREA = 32**2, 96**2  # COCO's size ranges
MIN_CLASS_INSTANCES = 5
HASH_SIZE = 8  # 8 x 8 = 64-bit difference hash
DUPLICATE_DISTANCE = 6  # bits of 64: resized, recompressed or slightly re-toned copies stay within it
MAX_LISTED = 10  # example pairs / names in one warning


def difference_hash(path: Path) -> int | None:
    """A 64-bit dHash (is each pixel brighter than its right neighbour, on a 9x8 grey thumbnail), or None.

    It survives resizing and recompression, not mirroring or cropping: what "the same photo
    exported twice" looks like. JPEGs are decoded at a reduced scale.
    """
    try:
        with Image.open(path) as im:
            im.draft("L", (4 * (HASH_SIZE + 1), 4 * HASH_SIZE))
            small = im.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError):
        return None
    px = list(small.tobytes())  # one byte per pixel, row by row
    bits = 0
    for row in range(HASH_SIZE):
        for col in range(HASH_SIZE):
            left, right = px[row * (HASH_SIZE + 1) + col], px[row * (HASH_SIZE + 1) + col + 1]
            bits = (bits << 1) | (left > right)
    return bits


def _area(a: dict[str, Any], im: dict[str, Any]) -> float | None:
    area = a.get("area")
    if isinstance(area, (int, float)) and not isinstance(area, bool) and area > 0:
        return float(area)
    try:
        return float(segmentation_area(a.get("segmentation"), int(im["height"]), int(im["width"])))
    except (ValueError, TypeError, KeyError):
        return None


def split_summary(raw: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one split's COCO dict (crowd regions are not instances)."""
    names = {c["id"]: c["name"] for c in raw["categories"]}
    images = {im["id"]: im for im in raw["images"]}
    per_image = dict.fromkeys(images, 0)
    per_class = dict.fromkeys(names.values(), 0)
    sizes = {"small": 0, "medium": 0, "large": 0}
    crowd = 0
    for a in raw["annotations"]:
        if a.get("iscrowd"):
            crowd += 1
            continue
        per_image[a["image_id"]] += 1
        per_class[names[a["category_id"]]] += 1
        area = _area(a, images[a["image_id"]])
        if area is not None:
            sizes["small" if area < SMALL_AREA else "medium" if area < MEDIUM_AREA else "large"] += 1
    n = sum(per_class.values())
    counts = list(per_image.values())
    sized = sum(sizes.values())
    return {
        "images": len(images), "instances": n, "crowd_regions": crowd,
        "instances_per_class": per_class,
        "instances_per_image": {"max": max(counts, default=0), "median": statistics.median(counts) if counts else 0},
        "size_shares": {k: round(v / sized, 3) if sized else 0.0 for k, v in sizes.items()},
        "images_without_annotations": sum(c == 0 for c in counts),
    }


def near_duplicates(train: list[Path], others: list[Path]) -> list[tuple[Path, Path, int]]:
    """(train image, val/test image, Hamming distance) for each pair within DUPLICATE_DISTANCE."""
    hashes = [(p, difference_hash(p)) for p in train]
    hashes = [(p, h) for p, h in hashes if h is not None]
    pairs = []
    for q in others:
        hq = difference_hash(q)
        if hq is None:
            continue
        best = min(((p, (h ^ hq).bit_count()) for p, h in hashes), key=lambda t: t[1], default=None)
        if best is not None and best[1] <= DUPLICATE_DISTANCE:
            pairs.append((best[0], q, best[1]))
    return pairs


def dataset_report(splits: dict[str, tuple[dict[str, Any], Path]], root: Path) -> dict[str, Any]:
    """The report of checked COCO splits {split: (COCO dict, image folder)}; paths are shown relative to `root`."""
    summary = {split: split_summary(raw) for split, (raw, _) in splits.items()}
    warnings: list[dict[str, str]] = []
    train = summary["train"]["instances_per_class"]
    rare = {name: n for name, n in train.items() if n < MIN_CLASS_INSTANCES}
    if rare:
        listed = ", ".join(f"{name!r} ({n})" for name, n in list(rare.items())[:MAX_LISTED])
        warnings.append({"code": "rare_class", "message": f"class(es) with fewer than {MIN_CLASS_INSTANCES} training "
                         f"instances: {listed}; a model rarely learns a class from so few examples, label more of "
                         "them or merge the class into another"})
    for split, s in summary.items():
        missing = [name for name in train if s["instances_per_class"].get(name, 0) == 0]
        if missing and split != "train":
            warnings.append({"code": "class_missing_from_split", "message": f"the {split} split has no instance of "
                             f"{', '.join(repr(m) for m in missing[:MAX_LISTED])}: its AP for them is not measured"})
        if s["images_without_annotations"]:
            why = ("training leaves them out (nothing to learn from): label their objects, if they have any"
                   if split == "train" else "they are scored as photos without objects, where any mask the model "
                   "finds counts against it: label their objects, if they have any")
            warnings.append({"code": "images_without_annotations", "message": f"{s['images_without_annotations']} "
                             f"of the {split} split's {s['images']} images have no annotation; {why}"})

    def paths(split: str) -> list[Path]:
        raw, folder = splits[split]
        return [folder / im["file_name"] for im in raw["images"]]

    held_out = [p for split in ("val", "test") if split in splits for p in paths(split)]
    if held_out:
        pairs = near_duplicates(paths("train"), held_out)
        if pairs:
            listed = "; ".join(f"{q.relative_to(root)} ~ {p.relative_to(root)}" for p, q, _ in pairs[:MAX_LISTED])
            warnings.append({"code": "near_duplicates", "message": f"{len(pairs)} val/test image(s) look like a "
                             f"training image (the same photo resized or recompressed): {listed}; their AP "
                             "overstates how the model does on new photos"})
    return {"splits": summary, "warnings": warnings}
