import numpy as np
import pytest
from pycocotools import mask as mask_utils

from models.data.masks import (
    decode_rle,
    encode_rle,
    mask_area,
    mask_to_bbox,
    mask_to_polygons,
    rle_string_counts,
    segmentation_area,
    segmentation_to_mask,
)


def _blob(h=60, w=80):
    m = np.zeros((h, w), np.uint8)
    m[10:40, 20:70] = 1
    m[30:55, 5:25] = 1
    return m


def _runs(m: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE by hand: column-major run lengths, starting with a run of zeros."""
    flat = m.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v == cur:
            n += 1
        else:
            runs.append(n)
            cur, n = v, 1
    runs.append(n)
    return runs


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_rle_round_trip_and_json_ready():
    m = _blob()
    rle = encode_rle(m)
    assert isinstance(rle["counts"], str) and rle["size"] == [60, 80]
    assert np.array_equal(decode_rle(rle), m)
    assert decode_rle(rle).dtype == np.uint8
    assert np.array_equal(segmentation_to_mask(rle, 60, 80), m)
    as_bytes = {"size": rle["size"], "counts": rle["counts"].encode()}
    assert np.array_equal(segmentation_to_mask(as_bytes, 60, 80), m)
    assert np.array_equal(decode_rle(encode_rle(m.astype(bool))), m)


def test_uncompressed_rle_equals_compressed():
    m = _blob()
    unc = {"size": [60, 80], "counts": _runs(m)}
    assert np.array_equal(segmentation_to_mask(unc, 60, 80), m)
    assert np.array_equal(segmentation_to_mask(unc, 60, 80), segmentation_to_mask(encode_rle(m), 60, 80))
    assert np.array_equal(decode_rle(unc), m)


def test_compressed_string_parser_matches_run_lengths():
    rng = np.random.default_rng(0)
    for _ in range(30):
        h, w = rng.integers(1, 40, 2)
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        assert rle_string_counts(encode_rle(m)["counts"]) == _runs(m)


def test_polygon_round_trip():
    m = _blob()
    polys = mask_to_polygons(m)
    assert polys and all(len(p) >= 6 and len(p) % 2 == 0 for p in polys)
    back = segmentation_to_mask(polys, 60, 80)
    assert _iou(back, m) > 0.9


def test_polygon_round_trip_of_a_disk_with_two_parts():
    yy, xx = np.mgrid[:120, :160]
    m = (((yy - 50) ** 2 + (xx - 60) ** 2) < 30**2) | (((yy - 100) ** 2 + (xx - 140) ** 2) < 12**2)
    m = m.astype(np.uint8)
    polys = mask_to_polygons(m)
    assert len(polys) == 2
    assert _iou(segmentation_to_mask(polys, 120, 160), m) > 0.9
    assert mask_to_polygons(np.zeros((10, 10), np.uint8)) == []


def test_tiny_contours_are_dropped():
    m = np.zeros((20, 20), np.uint8)
    m[5, 2:12] = 1  # a one-pixel line: its contour has only 2 points
    assert mask_to_polygons(m) == []


def test_polygon_with_two_parts_bbox_and_area_match_pycocotools():
    poly = [[0, 0, 10, 0, 10, 10, 0, 10], [20, 20, 30, 20, 30, 30, 20, 30]]
    m = segmentation_to_mask(poly, 40, 40)
    rle = mask_utils.merge(mask_utils.frPyObjects(poly, 40, 40))
    assert np.array_equal(m, mask_utils.decode(rle))
    assert mask_area(m) == int(mask_utils.area(rle)) == segmentation_area(poly, 40, 40)
    assert mask_to_bbox(m) == [float(v) for v in mask_utils.toBbox(rle)] == [0.0, 0.0, 30.0, 30.0]
    assert mask_to_bbox(np.zeros((5, 5), np.uint8)) == [0.0, 0.0, 0.0, 0.0]


def test_bbox_matches_pycocotools():
    m = _blob()
    assert np.allclose(mask_to_bbox(m), mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m))))
    one = np.zeros((5, 7), np.uint8)
    one[2, 3] = 1
    assert mask_to_bbox(one) == [3.0, 2.0, 1.0, 1.0]


@pytest.mark.parametrize("seg,message", [
    ([[1, 2, 3, 4]], "2 points"),  # pycocotools would silently read this as a box
    ([[0, 0, 10, 0, float("nan"), 10]], "non-finite"),
    ([[0, 0, 10, 0, 10, 10, 0]], "odd number"),
    ([], "empty polygon"),
    ([["a", 0, 1, 0, 1, 1]], "flat list of numbers"),
    ({"size": [5, 5], "counts": "0"}, "does not match"),
    ({"size": [60, 80], "counts": [10, 20]}, "sum to 30"),
    ({"size": [60, 80], "counts": [4800, -1, 1]}, "negative"),
    ({"size": [60, 80], "counts": "zz\x7f"}, "invalid character"),
    ({"size": [60, 80], "counts": "o"}, "ends in the middle"),
    ({"size": [60, 80], "counts": "3"}, "sum to 3"),
    ({"counts": "3"}, "'counts' and 'size'"),
    ("nope", "neither polygons nor RLE"),
])
def test_malformed_segmentations_raise_value_error(seg, message):
    with pytest.raises(ValueError, match=message):
        segmentation_to_mask(seg, 60, 80)
