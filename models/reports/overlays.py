"""Pictures: prediction overlays (Pillow + numpy) and learning curves (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from models.errors import DataError

# Distinct, readable colours (matplotlib's tab10), cycled by instance index so the same
# prediction list always gets the same colours.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


def draw_overlay(image: Image.Image, instances: list[dict], alpha: float = 0.5) -> Image.Image:
    """Coloured masks, mask outlines and "name 0.87" labels drawn over a copy of `image`.

    instances: dicts with "segmentation" (COCO RLE at the image's resolution; polygons also
        work), "category_name", "score" and "bbox" (xywh; computed from the mask when absent).
    alpha: opacity of the mask fill, 0 (invisible) to 1 (opaque).
    Returns a new RGB image of the same size; `image` is left untouched.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = base.shape[:2]
    out = base.copy()
    # Thin outlines vanish on big photos and thick ones swamp small ones: scale with the image.
    thickness = max(1, round(min(h, w) / 300))
    labels: list[tuple[str, tuple[float, float], tuple[int, int, int]]] = []
    for i, inst in enumerate(instances):
        mask = _instance_mask(inst, h, w, i)
        colour = PALETTE[i % len(PALETTE)]
        c = np.array(colour, dtype=np.float32)
        out[mask] = (1.0 - alpha) * out[mask] + alpha * c
        out[mask & ~_erode(mask, thickness)] = c
        labels.append((_label_text(inst), _label_anchor(inst, mask), colour))

    result = Image.fromarray(np.rint(out).clip(0, 255).astype(np.uint8))
    # Labels go on last so no later mask paints over an earlier label.
    draw = ImageDraw.Draw(result)
    font = _font(h, w)
    for text, (x, y), colour in labels:
        if not text:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 4
        # Above the box when there is room, otherwise just inside it; never off the image.
        ty = y - th if y - th >= 0 else y
        tx = min(max(0.0, x), max(0.0, w - tw))
        ty = min(max(0.0, ty), max(0.0, h - th))
        draw.rectangle((tx, ty, tx + tw - 1, ty + th - 1), fill=colour)
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=_text_colour(colour), font=font)
    return result


def plot_curves(history: list[dict], path: str | Path, keys: tuple[str, ...] = ("loss", "AP50")) -> None:
    """Learning curves as a PNG: one subplot per key that some history entry has, x = epoch.

    history: one dict per epoch, e.g. {"epoch": 3, "loss": 1.2, "AP50": 0.41}; entries that lack
        a key (or have None/NaN) are skipped for that key; without "epoch" the position (1-based) is used.
    """
    # The object-oriented API with an Agg canvas: no pyplot global state, no GUI backend,
    # safe to call from a worker thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, tuple[list[float], list[float]]] = {}
    for key in keys:
        xs, ys = [], []
        for i, entry in enumerate(history):
            v = entry.get(key)
            if v is None or not np.isfinite(float(v)):
                continue
            xs.append(float(entry.get("epoch", i + 1)))
            ys.append(float(v))
        if xs:
            series[key] = (xs, ys)

    n = max(1, len(series))
    fig = Figure(figsize=(4.5 * n, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    if not series:
        axes[0].text(0.5, 0.5, "no data", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, (key, (xs, ys)) in zip(axes, series.items()):
        ax.plot(xs, ys, marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------- internals


def _instance_mask(inst: dict, h: int, w: int, index: int) -> np.ndarray:
    """bool [H, W] mask of one instance; a size mismatch is the caller's image/prediction mix-up."""
    seg: Any = inst.get("segmentation")
    if seg is None:
        raise DataError(f"instance {index}: no 'segmentation'")
    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, *seg["size"])
    else:
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (h, w):
        raise DataError(f"instance {index}: mask is {mask.shape[0]}x{mask.shape[1]} "
                        f"but the image is {h}x{w}")
    return mask


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary erosion; pixels outside the image count as background."""
    m = mask
    for _ in range(steps):
        p = np.pad(m, 1, constant_values=False)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


def _label_text(inst: dict) -> str:
    name = str(inst.get("category_name", ""))
    score = inst.get("score")
    return f"{name} {float(score):.2f}".strip() if score is not None else name


def _label_anchor(inst: dict, mask: np.ndarray) -> tuple[float, float]:
    bbox = inst.get("bbox")
    if bbox is not None and len(bbox) >= 2:
        return float(bbox[0]), float(bbox[1])
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min())) if len(xs) else (0.0, 0.0)


def _font(h: int, w: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at a size readable on this image (bitmap fallback without FreeType)."""
    size = int(min(48, max(11, round(min(h, w) / 32))))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text_colour(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light label backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    luma = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luma > 150 else (255, 255, 255)
