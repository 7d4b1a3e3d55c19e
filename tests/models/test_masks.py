import numpy as np
from pycocotools import mask as mask_utils

from models.masks import decode_rle, encode_rle, mask_area, mask_to_bbox, mask_to_polygons, segmentation_to_mask


def _blob(h=60, w=80):
    m = np.zeros((h, w), np.uint8)
    m[10:40, 20:70] = 1
    m[30:55, 5:25] = 1
    return m


def test_rle_round_trip_and_json_ready():
    m = _blob()
    rle = encode_rle(m)
    assert isinstance(rle["counts"], str) and rle["size"] == [60, 80]
    assert np.array_equal(decode_rle(rle), m)
    assert np.array_equal(segmentation_to_mask(rle, 60, 80), m)


def test_uncompressed_rle_equals_compressed():
    m = _blob()
    # uncompressed RLE: column-major run lengths, starting with zeros
    flat = m.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v == cur:
            n += 1
        else:
            runs.append(n)
            cur, n = v, 1
    runs.append(n)
    assert np.array_equal(segmentation_to_mask({"size": [60, 80], "counts": runs}, 60, 80), m)


def test_polygon_round_trip():
    m = _blob()
    polys = mask_to_polygons(m)
    assert polys and all(len(p) >= 6 for p in polys)
    back = segmentation_to_mask(polys, 60, 80)
    inter, union = (back & m).sum(), (back | m).sum()
    assert inter / union > 0.9


def test_polygon_with_two_parts_and_bbox_area():
    poly = [[0, 0, 10, 0, 10, 10, 0, 10], [20, 20, 30, 20, 30, 30, 20, 30]]
    m = segmentation_to_mask(poly, 40, 40)
    rle = mask_utils.merge(mask_utils.frPyObjects(poly, 40, 40))
    assert mask_area(m) == int(mask_utils.area(rle))
    x, y, w, h = mask_to_bbox(m)
    assert (x, y) == (0.0, 0.0) and x + w == 31.0 or x + w == 30.0
    assert mask_to_bbox(np.zeros((5, 5), np.uint8)) == [0.0, 0.0, 0.0, 0.0]


def test_bbox_matches_pycocotools():
    m = _blob()
    assert np.allclose(mask_to_bbox(m), mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m))))
