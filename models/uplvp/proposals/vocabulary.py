"""Vocabularies: the category names pseudo masks are labelled with.

`parse_vocabulary` accepts the built-in name `coco` (the 80 COCO thing classes), a file
(one name per line, a JSON list of names, or a COCO JSON whose `categories` are used), or
a comma-separated string such as "cat,dog,car".
"""

from __future__ import annotations

import json
from pathlib import Path

from models.errors import ConfigError

COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]

BUILTIN = {"coco": COCO_CLASSES}


def _clean(names: list[str], source: str) -> list[str]:
    out: list[str] = []
    for n in names:
        n = " ".join(str(n).replace("_", " ").split())
        if n and n.lower() not in (o.lower() for o in out):
            out.append(n)
    if not out:
        raise ConfigError(f"the vocabulary from {source} is empty: give category names, e.g. --vocab 'cat,dog' "
                          f"or --vocab coco")
    return out


def parse_vocabulary(spec: str | list[str]) -> list[str]:
    """Category names from a built-in name, a file, or a comma-separated string (duplicates removed)."""
    if isinstance(spec, list):
        return _clean(spec, "the given list")
    spec = spec.strip()
    if spec.lower() in BUILTIN:
        return list(BUILTIN[spec.lower()])
    path = Path(spec)
    if path.suffix.lower() in (".txt", ".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{path}: vocabulary file not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc})") from None
            if isinstance(data, dict) and isinstance(data.get("categories"), list):
                data = [c.get("name", "") for c in data["categories"] if isinstance(c, dict)]
            if not isinstance(data, list):
                raise ConfigError(f"{path}: expected a JSON list of names or a COCO file with 'categories'")
            return _clean(data, str(path))
        return _clean([line.split("#")[0] for line in text.splitlines()], str(path))
    return _clean(spec.split(","), repr(spec))
