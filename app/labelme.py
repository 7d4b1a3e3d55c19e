"""labelme datasets (one JSON per image with polygon `shapes`) converted to one COCO instances JSON.

A zip with labelme files and no COCO file is converted on upload, so users of labelme (and of
tools that export its format) upload their folder as it is. Polygons and rectangles become
instance masks; shapes sharing a `group_id` and label are one instance (several polygons);
other shape types (points, lines, circles) cannot be masks and are listed as problems.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path, PurePosixPath
from typing import Any


def is_labelme(raw: Any) -> bool:
    """A labelme annotation file: an object with a `shapes` list and an `imagePath`."""
    return isinstance(raw, dict) and isinstance(raw.get("shapes"), list) and isinstance(raw.get("imagePath"), str)


def labelme_to_coco(files: dict[Path, dict], root: Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """(COCO dict with file names relative to `root`, problems) for labelme files {path: parsed JSON}."""
    images: list[dict] = []
    annotations: list[dict] = []
    names: dict[str, int] = {}
    problems: list[dict[str, str]] = []
    for path, raw in sorted(files.items()):
        rel = path.relative_to(root)
        # labelme stores the image path relative to the JSON ("../images/a.jpg"): relative to the root
        # here; one that escapes the root keeps its ".." and is refused by the COCO checks.
        image_rel = posixpath.normpath((PurePosixPath(rel.parent.as_posix()) / raw["imagePath"].replace("\\", "/"))
                                       .as_posix())
        w, h = raw.get("imageWidth"), raw.get("imageHeight")
        if not isinstance(w, (int, float)) or not isinstance(h, (int, float)):
            problems.append({"file": str(rel), "code": "invalid_labelme", "problem": "needs imageWidth and imageHeight"})
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": image_rel, "width": w, "height": h})
        groups: dict[Any, dict] = {}
        for i, shape in enumerate(raw["shapes"]):
            label, kind, pts = shape.get("label"), shape.get("shape_type") or "polygon", shape.get("points")
            if not isinstance(label, str) or not isinstance(pts, list):
                problems.append({"file": str(rel), "code": "invalid_labelme", "problem": f"shape {i}: needs a label "
                                 "and points"})
                continue
            if kind == "rectangle" and len(pts) == 2:
                (x0, y0), (x1, y1) = pts
                pts = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
            elif kind != "polygon":
                problems.append({"file": str(rel), "code": "invalid_labelme",
                                 "problem": f"shape {i} ({label!r}) is a {kind}, not a polygon or rectangle"})
                continue
            flat = [float(v) for p in pts for v in p]
            key = (shape.get("group_id"), label) if shape.get("group_id") is not None else ("shape", i)
            group = groups.setdefault(key, {"label": label, "polygons": []})
            group["polygons"].append(flat)
        for group in groups.values():
            cat = names.setdefault(group["label"], len(names) + 1)
            xs = [v for poly in group["polygons"] for v in poly[0::2]]
            ys = [v for poly in group["polygons"] for v in poly[1::2]]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "segmentation": group["polygons"], "iscrowd": 0,
                                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)] if xs else [0, 0, 0, 0]})
    coco = {"info": {"description": "converted from labelme"}, "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in names.items()]}
    return coco, problems


def convert_folder(root: Path, files: dict[Path, dict]) -> tuple[Path, list[dict[str, str]]]:
    """Write the COCO file of labelme `files` as root/annotations.coco.json; returns (its path, problems)."""
    coco, problems = labelme_to_coco(files, root)
    out = root / "annotations.coco.json"
    out.write_text(json.dumps(coco))
    return out, problems
