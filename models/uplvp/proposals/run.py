"""Proposing over a folder of images: a resumable run that writes a COCO instances JSON.

The output is what `uplvp finetune` / `uplvp pretrain` read: `images`, `categories` (the
vocabulary, ids 1..V), `annotations` (RLE segmentation, bbox, area, score, iscrowd 0),
plus `info` (engine, vocabulary, K) and `skipped` (images that could not be decoded, with the
reason). Progress is appended to `<out>.partial.jsonl` one image per line, so a run that is
stopped (Ctrl-C, a killed worker) continues where it left off when started again with the
same arguments. A run with a time limit (`max_seconds`, what a budgeted UPLVP job gives its
proposals) visits the images in a seeded random order and ends when the time is spent: the
images it reached are a uniform sample of the folder, not its first files by name.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from models.data.coco import IMAGE_EXTENSIONS, load_image
from models.data.masks import encode_rle, mask_area, mask_to_bbox
from models.errors import ConfigError, DataError
from models.uplvp.proposals.base import ProposalEngine, PseudoMask


def list_images_recursive(root: str | Path) -> list[Path]:
    """Image files (by extension) under `root`, at any depth, sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return files


def propose(
    images: Iterable[Image.Image], engine: ProposalEngine, max_masks: int = 10
) -> list[tuple[Image.Image, list[PseudoMask]]]:
    """Pseudo masks for in-memory images: [(image, [PseudoMask, ...] best first, at most K)]."""
    if max_masks < 1:
        raise ConfigError(f"max_masks must be >= 1, got {max_masks}")
    return [(im, engine.propose(im, max_masks)) for im in images]


def _annotations(masks: list[PseudoMask], vocabulary: list[str]) -> list[dict]:
    cat_id = {name: i + 1 for i, name in enumerate(vocabulary)}
    out = []
    for pm in masks:
        if mask_area(pm.mask) == 0:
            continue
        out.append({"category_id": cat_id[pm.category], "segmentation": encode_rle(pm.mask),
                    "bbox": mask_to_bbox(pm.mask), "area": mask_area(pm.mask),
                    "score": round(float(pm.score), 5), "iscrowd": 0})
    return out


def propose_folder(
    image_dir: str | Path,
    engine: ProposalEngine,
    out: str | Path,
    max_masks: int = 10,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_seconds: float = 0.0,
    seed: int = 0,
) -> dict:
    """Propose for every image under `image_dir` and write a COCO JSON to `out`; returns it.

    Resumes from `<out>.partial.jsonl` when it was written by a run with the same engine,
    vocabulary and K. `progress(done, total)` is called after each image; `should_stop()`
    returning True stops after the current image (the partial file keeps what was done), and
    the return is {} (nothing written to `out`).

    `max_seconds` > 0 limits this call's proposing time: the images are visited in an order
    shuffled by `seed`, and once the time is spent the file is written with the images reached
    so far; ``info["images_not_reached"]`` counts the others (0 when every image was proposed).
    """
    if max_masks < 1:
        raise ConfigError(f"max_masks must be >= 1, got {max_masks}")
    image_dir, out = Path(image_dir), Path(out)
    files = list_images_recursive(image_dir)
    header = {"engine": engine.name, "vocabulary": engine.vocabulary, "max_masks": max_masks,
              "images": str(image_dir.resolve())}
    partial = out.with_name(out.name + ".partial.jsonl")
    done: dict[str, dict] = {}
    if partial.is_file():
        lines = partial.read_text(encoding="utf-8").splitlines()
        if lines and json.loads(lines[0]) == header:
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by a kill: redo that image
                done[rec["file_name"]] = rec
        else:
            partial.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not partial.is_file():
        partial.write_text(json.dumps(header) + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    order = list(files)
    if max_seconds > 0:  # a time-limited run reaches a uniform sample of the pool, whatever its names
        random.Random(seed).shuffle(order)
    out_of_time = False
    with partial.open("a", encoding="utf-8") as log:
        for i, path in enumerate(order):
            rel = path.relative_to(image_dir).as_posix()
            if rel not in done:
                if should_stop is not None and should_stop():
                    break
                if max_seconds > 0 and time.perf_counter() - t0 >= max_seconds:
                    out_of_time = True
                    break
                try:
                    img = load_image(path)
                    rec = {"file_name": rel, "height": img.height, "width": img.width,
                           "annotations": _annotations(engine.propose(img, max_masks), engine.vocabulary)}
                except DataError as exc:
                    rec = {"file_name": rel, "skipped": str(exc).removeprefix(f"{path}: ")}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                done[rel] = rec
            if progress is not None:
                progress(i + 1, len(files))
    if len(done) < len(files) and not out_of_time:
        return {}
    reached = [f for f in files if f.relative_to(image_dir).as_posix() in done]
    coco = _assemble(reached, image_dir, done, header, time.perf_counter() - t0)
    coco["info"]["images_not_reached"] = len(files) - len(reached)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(coco), encoding="utf-8")
    os.replace(tmp, out)
    partial.unlink()
    return coco


def _assemble(files: list[Path], image_dir: Path, done: dict[str, dict], header: dict, seconds: float) -> dict:
    images, annotations, skipped = [], [], []
    for image_id, path in enumerate(files, start=1):
        rec = done[path.relative_to(image_dir).as_posix()]
        if "skipped" in rec:
            skipped.append({"file_name": rec["file_name"], "reason": rec["skipped"]})
            continue
        images.append({"id": image_id, "file_name": rec["file_name"], "height": rec["height"], "width": rec["width"]})
        for ann in rec["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    return {
        "info": {"description": "uplvp pseudo masks", "engine": header["engine"], "max_masks": header["max_masks"],
                 "vocabulary": header["vocabulary"], "seconds_this_run": round(seconds, 1)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "pseudo"} for i, n in enumerate(header["vocabulary"])],
        "skipped": skipped,
    }
