"""Mask format helpers: COCO polygons / RLE <-> binary masks, boxes, polygons.

Masks are numpy uint8 arrays [H, W] holding 0/1. Segmentations are decoded exactly as
pycocotools' ``COCO.annToMask`` does, so training targets match what COCOeval scores.

Malformed segmentations raise ValueError with a short reason (no file name: the caller,
e.g. models.data.coco.CocoAnnotations, knows the file and annotation and wraps it in a
DataError). They are checked *before* they reach pycocotools, whose C decoder does not
bounds-check run lengths and would crash or silently read garbage.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils


def rle_string_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE string (a port of pycocotools' rleFrString).

    Each count is a little-endian base-32 varint in chars '0'..'o' (offset 48; bit 0x20 =
    "more", bit 0x10 of the last chunk = sign); counts after the second are stored as
    deltas from the count two places back. Raises ValueError on a malformed string.
    """
    s = counts.decode("ascii", errors="replace") if isinstance(counts, bytes) else counts
    out: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("compressed RLE 'counts' string ends in the middle of a number")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE 'counts' has an invalid character {s[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def _check_size(size: Any, height: int, width: int) -> None:
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise ValueError(f"RLE 'size' must be [height, width], got {size!r}")
    if [int(size[0]), int(size[1])] != [int(height), int(width)]:
        raise ValueError(f"RLE size {list(size)} does not match the image size [{height}, {width}]")


def _check_counts(counts: list[int], height: int, width: int) -> None:
    if any(c < 0 for c in counts):
        raise ValueError("RLE 'counts' has a negative run length")
    if sum(counts) != height * width:
        raise ValueError(f"RLE run lengths sum to {sum(counts)}, not height*width = {height * width}")


def _check_polygon(poly: Any) -> None:
    if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
        raise ValueError("has a polygon that is not a flat list of numbers [x1, y1, x2, y2, ...]")
    if len(poly) < 6:
        # pycocotools reads a 4-number list as a box, not a polygon: never let it get there.
        raise ValueError(f"has a polygon with {len(poly) // 2} points (need >= 3)")
    if len(poly) % 2:
        raise ValueError(f"has a polygon with an odd number of coordinates ({len(poly)})")
    if not all(math.isfinite(v) for v in poly):
        raise ValueError("has a polygon with non-finite coordinates")


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """Validated COCO segmentation -> compressed RLE ``{"size": [H, W], "counts": bytes}``.

    Accepts polygons (list of flat [x1, y1, x2, y2, ...] lists; several parts are merged),
    uncompressed RLE (``counts`` a list of run lengths) and compressed RLE (``counts`` a str
    or bytes). Raises ValueError naming the problem.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("has an empty polygon list")
        for poly in segmentation:
            _check_polygon(poly)
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if not isinstance(segmentation, dict):
        raise ValueError("has a 'segmentation' that is neither polygons nor RLE")
    if "counts" not in segmentation or "size" not in segmentation:
        raise ValueError("has an RLE segmentation without 'counts' and 'size'")
    _check_size(segmentation["size"], height, width)
    counts = segmentation["counts"]
    if isinstance(counts, list):  # uncompressed RLE (e.g. COCO crowd regions)
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ValueError("has uncompressed RLE 'counts' that are not all integers")
        _check_counts(counts, height, width)
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    if isinstance(counts, (str, bytes)):
        _check_counts(rle_string_counts(counts), height, width)
        raw = counts.encode("ascii") if isinstance(counts, str) else counts
        return {"size": [int(height), int(width)], "counts": raw}
    raise ValueError("has RLE 'counts' that is neither a list of run lengths nor a string")


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> uint8 [H, W] in {0, 1}."""
    return np.ascontiguousarray(mask_utils.decode(segmentation_to_rle(segmentation, height, width)), dtype=np.uint8)


def segmentation_area(segmentation: Any, height: int, width: int) -> int:
    """Pixel area of a COCO segmentation, computed on its RLE (no [H, W] mask is built)."""
    return int(mask_utils.area(segmentation_to_rle(segmentation, height, width)))


def _as_mask(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask [H, W], got shape {m.shape}")
    return m


def encode_rle(mask: np.ndarray) -> dict:
    """Binary mask [H, W] (bool or 0/1) -> compressed RLE ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    m = _as_mask(mask)
    rle = mask_utils.encode(np.asfortranarray(m != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_masks(binary: np.ndarray) -> list[dict]:
    """[K,H,W] bool -> K compressed RLEs with str counts (JSON-ready)."""
    if binary.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def decode_masks(rles: list[dict]) -> list[np.ndarray]:
    """encode_masks' RLEs (str or bytes counts) -> uint8 [H, W] masks in {0, 1}."""
    if not rles:
        return []
    raw = [{"size": r["size"], "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str) else r["counts"]}
           for r in rles]
    stack = mask_utils.decode(raw)  # [H, W, K], Fortran order
    return [np.ascontiguousarray(stack[..., k]) for k in range(stack.shape[-1])]


def decode_rle(rle: dict) -> np.ndarray:
    """Compressed RLE (str or bytes ``counts``) or uncompressed RLE -> uint8 [H, W] in {0, 1}."""
    if not isinstance(rle, dict) or "size" not in rle:
        raise ValueError("RLE must be a dict with 'size' and 'counts'")
    h, w = rle["size"]
    return segmentation_to_mask(rle, int(h), int(w))


def mask_to_bbox(mask: np.ndarray) -> list[float]:
    """Tight box [x, y, w, h] of the nonzero pixels (COCO convention, = pycocotools toBbox).

    A pixel (x, y) covers [x, x+1) x [y, y+1), so a single pixel has w = h = 1.
    All-zero mask -> [0, 0, 0, 0].
    """
    m = _as_mask(mask)
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    if len(cols) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = float(cols[0]), float(rows[0])
    return [x0, y0, float(cols[-1]) + 1 - x0, float(rows[-1]) + 1 - y0]


def mask_area(mask: np.ndarray) -> int:
    """Number of nonzero pixels of a mask [H, W]."""
    return int(np.count_nonzero(mask))


def mask_to_polygons(mask: np.ndarray, min_points: int = 3) -> list[list[float]]:
    """Outer contours of a binary mask [H, W] as COCO polygons ``[[x1, y1, x2, y2, ...], ...]``.

    Holes are not represented (external contours only); contours with fewer than
    `min_points` points (e.g. a one-pixel-wide line reduced to its two ends) are dropped.
    """
    m = np.ascontiguousarray(_as_mask(mask) != 0, dtype=np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        if len(c) >= max(3, min_points):
            # +0.5: OpenCV returns pixel indices (pixel centres); COCO coordinates are continuous,
            # pixel x spanning [x, x+1). Same convention as detectron2's mask_to_polygons.
            polys.append([float(v) + 0.5 for v in c.reshape(-1)])
    return polys
