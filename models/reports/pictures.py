"""Reports as pictures: a fine-tune's learning curve and an evaluation grid (ground truth vs predictions).

Both are PNG files written next to a model's checkpoint; the service stores them with the model
version and the web page shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from models.reports.overlays import draw_overlay, plot_curves


def learning_curve_png(history: list[dict[str, Any]], out: str | Path) -> Path:
    """Loss (and AP / AP50 where an epoch was evaluated) per epoch, as a PNG."""
    plot_curves(history, out, keys=("loss", "AP", "AP50"))
    return Path(out)


def evaluation_grid_png(predictor: Any, annotations: Any, out: str | Path, max_images: int = 6,
                        score_threshold: float = 0.3, cell: int = 320) -> Path:
    """For up to `max_images` images of a CocoAnnotations set: the ground truth (left) beside the
    model's predictions (right), one row per image, each panel scaled to `cell` pixels high."""
    from models.data.coco import load_image

    names = dict(zip(annotations.categories.ids, annotations.categories.names))
    by_image: dict[int, list[dict]] = {}
    for a in annotations.raw.get("annotations", []):
        if not a.get("iscrowd"):
            by_image.setdefault(a["image_id"], []).append(
                {"segmentation": a["segmentation"], "category_name": names.get(a["category_id"], "?"),
                 "bbox": a.get("bbox")})
    images = annotations.images[:max_images]
    pictures = [load_image(annotations.image_root / im["file_name"]) for im in images]
    predictions = predictor.predict_images(pictures, score_threshold)
    rows = []
    for im, picture, pred in zip(images, pictures, predictions):
        truth = draw_overlay(picture, by_image.get(im["id"], []))
        guess = draw_overlay(picture, pred)
        scale = cell / picture.height
        size = (max(1, round(picture.width * scale)), cell)
        rows.append((truth.resize(size), guess.resize(size)))
    width = max((a.width + b.width for a, b in rows), default=cell) + 30
    grid = Image.new("RGB", (width, 24 + len(rows) * (cell + 10)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((10, 5), "ground truth", fill="black")
    draw.text((width // 2 + 10, 5), f"predictions (score >= {score_threshold:g})", fill="black")
    y = 24
    for truth, guess in rows:
        grid.paste(truth, (10, y))
        grid.paste(guess, (20 + truth.width, y))
        y += cell + 10
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return Path(out)
