"""Pictures: prediction overlays and learning curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.masks import decode_rle

# Distinct, readable colours (tab10-like), cycled by instance index.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


def draw_overlay(image: Image.Image, instances: list[dict], alpha: float = 0.5) -> Image.Image:
    """Coloured masks, outlines and "name score" labels drawn over a copy of `image`.

    instances: dicts with "segmentation" (RLE at the image's size), "category_name", "score", "bbox" (xywh).
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = base.copy()
    outlines = np.zeros(base.shape[:2], dtype=bool)
    colours = []
    for i, inst in enumerate(instances):
        m = decode_rle(inst["segmentation"]).astype(bool)
        colour = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
        colours.append(tuple(int(c) for c in colour))
        out[m] = (1 - alpha) * out[m] + alpha * colour
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = colour
        outlines |= edge
    result = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(result)
    font = ImageFont.load_default()
    for inst, colour in zip(instances, colours):
        x, y = inst["bbox"][:2]
        text = f"{inst['category_name']} {inst['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
        draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return result


def plot_curves(history: list[dict], path: str | Path, keys: tuple[str, ...] = ("loss", "AP50")) -> None:
    """One subplot per key present in the history entries, x = epoch; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(e.get(k) is not None for e in history)]
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(5 * max(1, len(present)), 3.5), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(e["epoch"], e[key]) for e in history if e.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(key)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
