"""What every upload format shares: image extensions, split names, and the list of problems found.

The formats themselves: COCO (app/dataset.py, also Roboflow's COCO export: app/roboflow.py),
labelme (app/labelme.py) and Ultralytics YOLO segmentation (app/yolo.py); each converter reports
its problems the same way, so a user fixes the zip once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAX_PROBLEMS = 20
# split names as exporters write them -> ours ("valid" is Roboflow's, "val" Ultralytics')
SPLITS = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": "test"}


@dataclass
class Problems:
    """Problems found in an upload, each {file, code, problem}; at most MAX_PROBLEMS are kept, all counted."""

    items: list[dict[str, str]] = field(default_factory=list)
    count: int = 0

    def add(self, file: str, code: str, problem: str) -> None:
        self.count += 1
        if len(self.items) < MAX_PROBLEMS:
            self.items.append({"file": file, "code": code, "problem": problem})

    def __bool__(self) -> bool:
        return self.count > 0
