"""Ultralytics YOLO segmentation datasets (`data.yaml` + images/ + labels/*.txt) converted to COCO.

The layout Ultralytics trains from and Roboflow exports as "YOLOv8": a YAML file with the class
`names` and the `train` / `val` / `test` image folders (or lists of folders, or .txt files listing
images), relative to its `path` key or to the YAML's own folder. Each image's label file is the
image's path with the last ``images`` folder replaced by ``labels`` and a ``.txt`` suffix; each of
its lines is ``class x1 y1 x2 y2 ... xn yn``, a polygon in coordinates normalised to [0, 1]. An
image without a label file is a photo without objects.

Every problem is reported with its file and line, like the COCO checks: a line with an odd number
of coordinates or fewer than 3 points, a box-only (detection) line, a class id out of range,
coordinates outside [0, 1], a label file without an image, and paths that leave the zip.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from app.formats import IMAGE_EXTENSIONS, SPLITS, Problems
from models.data.masks import segmentation_area  # numpy / pycocotools only: no torch

EXIF_ORIENTATION = 0x0112
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
COORD_TOLERANCE = 1e-6  # exporters round; 1.0000001 is still the image's edge


def find_data_yaml(root: Path) -> tuple[Path, dict] | None:
    """The YOLO dataset YAML under `root` (one with `names` and `train`), preferring data.yaml, or None."""
    candidates = sorted((p for p in root.rglob("*") if p.suffix.lower() in (".yaml", ".yml") and p.is_file()),
                        key=lambda p: (p.name.lower() not in ("data.yaml", "data.yml"), len(p.parts), str(p)))
    for path in candidates:
        try:
            raw = yaml.safe_load(path.read_text(errors="replace"))
        except yaml.YAMLError:
            continue
        if isinstance(raw, dict) and "names" in raw and "train" in raw:
            return path, raw
    return None


def class_names(raw: dict, problems: Problems, yaml_rel: str) -> list[str]:
    """`names` as a list (Ultralytics accepts a list or a {id: name} mapping with ids 0..n-1)."""
    names = raw.get("names")
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            problems.add(yaml_rel, "invalid_yolo", f"'names' ids must be 0..{len(keys) - 1}, got {keys[:10]}")
            return []
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        problems.add(yaml_rel, "invalid_yolo", "'names' must be a non-empty list of class names (or {id: name})")
        return []
    names = [str(n) for n in names]
    if "nc" in raw and raw["nc"] != len(names):
        problems.add(yaml_rel, "invalid_yolo", f"'nc' is {raw['nc']!r} but 'names' has {len(names)} entries")
    if len(set(names)) != len(names):
        problems.add(yaml_rel, "invalid_yolo", "'names' has a name twice")
    return names


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def _split_images(entry: Any, base: Path, root: Path, key: str, yaml_rel: str, problems: Problems) -> list[Path]:
    """The image files of one split entry: a folder, a .txt listing images, or a list of those."""
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for e in entries:
        if not isinstance(e, str) or not e.strip():
            problems.add(yaml_rel, "invalid_yolo", f"'{key}' must be a folder or .txt path (or a list of them), got {e!r}")
            continue
        target = (base / e).resolve()
        if not _inside(target, root) or not target.exists():
            # Roboflow writes "../train/images" for a YAML that sits beside train/; Ultralytics tries
            # the path without its leading "../" too
            alt = (base / e[3:]).resolve() if e.startswith("../") else None
            if alt is not None and _inside(alt, root) and alt.exists():
                target = alt
            elif not _inside(target, root):
                problems.add(yaml_rel, "yolo_path_outside", f"'{key}: {e}' points outside the zip; use a path "
                             "relative to the YAML's folder (or to its 'path') inside the zip")
                continue
            else:
                problems.add(yaml_rel, "invalid_yolo", f"'{key}: {e}' is not in the zip")
                continue
        if target.is_dir():
            images += sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif target.suffix.lower() == ".txt":
            for line in target.read_text(errors="replace").splitlines():
                line = line.strip()
                if not line:
                    continue
                p = (target.parent / line).resolve()
                if not _inside(p, root):
                    problems.add(str(target.relative_to(root)), "yolo_path_outside",
                                 f"lists {line!r}, which is outside the zip")
                elif p.is_file():
                    images.append(p)
                else:
                    problems.add(str(target.relative_to(root)), "invalid_yolo", f"lists {line!r}, which is not in the zip")
        else:
            problems.add(yaml_rel, "invalid_yolo", f"'{key}: {e}' is neither a folder nor a .txt list of images")
    return images


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def displayed_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as the image is shown (EXIF rotation applied, as training loads it), or None."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(EXIF_ORIENTATION)
    except (OSError, ValueError, SyntaxError):
        return None
    return (h, w) if orientation in ROTATED else (w, h)


def parse_label(text: str, width: int, height: int, num_classes: int, rel: str,
                problems: Problems) -> list[tuple[int, list[float]]]:
    """[(class id, polygon in pixels [x1, y1, ...])] of one label file; bad lines go to `problems`."""
    out: list[tuple[int, list[float]]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"line {n}"
        try:
            values = [float(v) for v in fields]
        except ValueError:
            problems.add(rel, "invalid_yolo", f"{where}: not numbers ({line.strip()[:60]!r})")
            continue
        cls, coords = values[0], values[1:]
        if not cls.is_integer() or not 0 <= cls < num_classes:
            problems.add(rel, "invalid_yolo", f"{where}: class id {fields[0]} is out of range; data.yaml has "
                         f"{num_classes} class(es), ids 0..{num_classes - 1}")
            continue
        if len(coords) == 4:
            problems.add(rel, "invalid_yolo", f"{where}: 4 numbers are a detection box (cx cy w h), not a "
                         "polygon; export the dataset in YOLO segmentation format")
            continue
        if len(coords) % 2:
            problems.add(rel, "invalid_yolo", f"{where}: {len(coords)} coordinates, an odd number; a polygon is "
                         "x y pairs")
            continue
        if len(coords) < 6:
            problems.add(rel, "invalid_yolo", f"{where}: a polygon needs at least 3 points, got {len(coords) // 2}")
            continue
        if not all(math.isfinite(v) and -COORD_TOLERANCE <= v <= 1 + COORD_TOLERANCE for v in coords):
            bad = next(v for v in coords if not (math.isfinite(v) and -COORD_TOLERANCE <= v <= 1 + COORD_TOLERANCE))
            problems.add(rel, "invalid_yolo", f"{where}: coordinate {bad:g} is outside [0, 1]; YOLO labels are "
                         "normalised by the image's width and height")
            continue
        poly = [min(max(v, 0.0), 1.0) * (width if i % 2 == 0 else height) for i, v in enumerate(coords)]
        out.append((int(cls), poly))
    return out


def yolo_to_coco(root: Path, yaml_path: Path, raw: dict, problems: Problems,
                 notes: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{split: COCO dict with file names relative to `root`} of a YOLO segmentation dataset.

    The split paths are relative to the YAML's `path` when that is a folder inside the zip. A
    `path` outside it (absolute, or ``../datasets/x``) is where the dataset lived on the exporter's
    machine: the zip is the dataset, so the YAML's own folder is used instead (and `notes` says so).
    The split paths themselves must stay inside the zip.
    """
    root = root.resolve()
    yaml_rel = str(yaml_path.relative_to(root))
    names = class_names(raw, problems, yaml_rel)
    base = yaml_path.parent.resolve()
    if isinstance(raw.get("path"), str) and raw["path"].strip():
        p = base / raw["path"]
        if _inside(p, root) and p.resolve().is_dir():
            base = p.resolve()
        elif notes is not None:
            notes.append(f"ignored data.yaml's 'path: {raw['path']}' (not a folder in the zip): the split paths are "
                         f"read relative to {yaml_path.parent.relative_to(root).as_posix() or 'the zip root'}")
    if not names:
        return {}
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    out: dict[str, dict[str, Any]] = {}
    used_labels: set[Path] = set()
    ann_id = 0
    for key in ("train", "val", "test"):
        if raw.get(key) in (None, ""):
            continue
        images = _split_images(raw[key], base, root, key, yaml_rel, problems)
        coco: dict[str, Any] = {"info": {"description": f"converted from YOLO ({yaml_rel}, {key})"},
                                "images": [], "annotations": [], "categories": categories}
        for img in images:
            size = displayed_size(img)
            rel = str(img.relative_to(root))
            if size is None:
                problems.add(rel, "unsupported_image", "is not a readable image")
                continue
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": rel, "width": size[0], "height": size[1]})
            lab = label_path(img)
            if not lab.is_file():
                continue  # an image without objects
            used_labels.add(lab.resolve())
            for cls, poly in parse_label(lab.read_text(errors="replace"), size[0], size[1], len(names),
                                         str(lab.relative_to(root)), problems):
                ann_id += 1
                xs, ys = poly[0::2], poly[1::2]
                coco["annotations"].append({
                    "id": ann_id, "image_id": image_id, "category_id": cls + 1, "segmentation": [poly],
                    "area": float(segmentation_area([poly], size[1], size[0])), "iscrowd": 0,
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]})
        out[SPLITS.get(key, key)] = coco
    for lab in sorted(p for p in root.rglob("*.txt") if "labels" in p.relative_to(root).parts[:-1]):
        if lab.name == "classes.txt" or lab.resolve() in used_labels:
            continue
        parts = list(lab.relative_to(root).parts)
        i = len(parts) - 2 - parts[-2::-1].index("labels")
        parts[i] = "images"
        stem = root.joinpath(*parts).with_suffix("")
        if not any(stem.with_suffix(ext).is_file() or stem.with_suffix(ext.upper()).is_file()
                   for ext in IMAGE_EXTENSIONS):
            problems.add(str(lab.relative_to(root)), "invalid_yolo", f"is a label file without an image (no "
                         f"{stem.relative_to(root)}.jpg, .png, ... in the zip)")
    return out


def write_converted(root: Path, splits: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """Write each split's COCO as root/uplvp_coco/<split>.json; returns {split: path}."""
    folder = root / "uplvp_coco"
    folder.mkdir(exist_ok=True)
    paths = {}
    for split, coco in splits.items():
        paths[split] = folder / f"{split}.json"
        paths[split].write_text(json.dumps(coco))
    return paths
