"""Mask format helpers: COCO polygons / RLE <-> binary masks, boxes, polygons."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation (polygons, uncompressed RLE, or compressed RLE) -> uint8 [H,W] in {0,1}.

    Decoded exactly as pycocotools' COCO.annToMask does, so training targets match evaluation.
    """
    if isinstance(segmentation, list):  # polygons: one object may have several parts
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(np.uint8)


def encode_rle(mask: np.ndarray) -> dict:
    """uint8/bool [H,W] -> compressed RLE ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_rle(rle: dict) -> np.ndarray:
    """Compressed RLE (str or bytes counts) -> uint8 [H,W]."""
    r = dict(rle)
    if isinstance(r["counts"], str):
        r["counts"] = r["counts"].encode("ascii")
    return mask_utils.decode(r).astype(np.uint8)


def mask_to_bbox(mask: np.ndarray) -> list[float]:
    """Tight box [x, y, w, h] of the nonzero pixels (COCO convention); [0,0,0,0] when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = float(xs.min()), float(ys.min())
    return [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0]


def mask_area(mask: np.ndarray) -> int:
    return int(np.count_nonzero(mask))


def mask_to_polygons(mask: np.ndarray, min_points: int = 3) -> list[list[float]]:
    """Outer contours of a binary mask as COCO polygons ``[[x1, y1, x2, y2, ...], ...]``."""
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        if len(c) >= min_points:
            # +0.5: contour points are pixel centres; COCO polygons trace pixel boundaries.
            polys.append([float(v) + 0.5 for v in c.reshape(-1)])
    return polys
