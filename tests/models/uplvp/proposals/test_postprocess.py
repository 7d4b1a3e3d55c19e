import numpy as np
import pytest
import torch

from models.uplvp.proposals.postprocess import (
    components_per_class,
    greedy_dedupe,
    normalized_cut_masks,
    self_similarity_masks,
    snap_to_segments,
)


def _square(y0, x0, s, size=20):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y0 + s, x0:x0 + s] = True
    return m


def test_greedy_dedupe_keeps_k_best_non_overlapping():
    masks = torch.stack([_square(0, 0, 10), _square(0, 1, 10), _square(12, 12, 6), _square(0, 12, 6)])
    keep = greedy_dedupe(masks, torch.tensor([0.9, 0.8, 0.7, 0.6]), iou_threshold=0.5, k=2)
    assert keep == [0, 2]


def test_self_similarity_separates_two_regions():
    # features: left half one direction, right half another (+ noise)
    g = torch.Generator().manual_seed(0)
    f = torch.zeros(8, 6, 10)
    f[0, :, :5] = 1
    f[1, :, 5:] = 1
    f += 0.05 * torch.randn(f.shape, generator=g)
    soft, maskness = self_similarity_masks(f, scales=(1.0,))
    assert soft.shape == (60, 6, 10) and maskness.shape == (60,)
    assert soft.min() >= 0 and soft.max() <= 1
    left_query = soft[2 * 10 + 1] >= 0.5  # query at (2, 1)
    assert left_query[:, :5].all() and not left_query[:, 5:].any()
    assert (maskness > 0.7).all()


def test_components_per_class_splits_and_filters():
    probs = np.zeros((2, 20, 20), dtype=np.float32)
    probs[1] = 1.0
    probs[0, 2:6, 2:6] = 2.0  # class 0 wins in two separate squares, one too small
    probs[0, 12:18, 12:18] = 2.0
    probs[0, 0, 19] = 2.0
    probs /= probs.sum(0, keepdims=True)
    comps = components_per_class(probs, threshold=0.6, min_area_frac=0.01)
    class0 = [c for c in comps if c[1] == 0]
    assert sorted(int(m.sum()) for m, _, _ in class0) == [16, 36]
    assert all(0 < s <= 1 for _, _, s in comps)


def test_snap_to_segments_follows_segment_edges():
    segments = np.zeros((10, 10), dtype=np.int64)
    segments[:, 5:] = 1
    soft = torch.zeros(1, 10, 10)
    soft[0, :, :6] = 1.0  # a coarse mask that spills one column over the edge
    snapped = snap_to_segments(soft, segments, threshold=0.5)
    assert snapped[0, :, :5].all() and not snapped[0, :, 5:].any()


def _two_objects_on_background(h: int, w: int) -> torch.Tensor:
    """Features [8, h, w]: background along one direction, two separate objects along another."""
    g = torch.Generator().manual_seed(0)
    f = torch.zeros(8, h, w)
    f[0] = 1.0
    for y0, y1, x0, x1 in ((3, 8, 4, 11), (12, 16, 20, 27)):
        f[0, y0:y1, x0:x1] = 0.0
        f[1, y0:y1, x0:x1] = 1.0
    return f + 0.05 * torch.randn(f.shape, generator=g)


@pytest.mark.parametrize("size", [(6, 10), (20, 30)])  # the dense solver below 65 patches, Lanczos above
def test_normalized_cut_finds_the_objects_and_splits_them_into_parts(size):
    h, w = size
    f = _two_objects_on_background(h, w) if size == (20, 30) else None
    if f is None:  # a small grid: one object on the left
        f = torch.zeros(8, h, w)
        f[0] = 1.0
        f[0, 1:4, 1:4], f[1, 1:4, 1:4] = 0.0, 1.0
    out = normalized_cut_masks(f, cuts=2, tau=0.5)
    assert out and all(m.shape == (h, w) and m.dtype == bool and 0 <= q <= 1 for m, q in out)
    first, quality = out[0]
    truth = f[1].numpy() > 0.5
    assert (first == truth).all()  # the objects, not the background
    assert quality > 0.9  # a clean cut: the two sides barely link
    if size == (20, 30):
        parts = [m for m, _ in out[1:3]]
        assert sorted(int(m.sum()) for m in parts) == [28, 35]
        assert all((m & truth).sum() == m.sum() for m in parts)


def test_normalized_cut_of_a_uniform_map_is_a_poor_cut():
    f = torch.ones(8, 10, 10) + 0.01 * torch.randn(8, 10, 10, generator=torch.Generator().manual_seed(0))
    assert all(q < 0.1 for _, q in normalized_cut_masks(f, cuts=2, tau=0.5))


def test_grouped_segments_join_an_objects_parts_and_rank_objects_above_background():
    from models.uplvp.proposals.postprocess import grouped_segments

    # 64 x 64: background (0); object A in two colour segments (1 top, 2 bottom); object B one segment (3)
    seg = np.zeros((64, 64), dtype=np.int64)
    seg[16:32, 8:24], seg[32:48, 8:24], seg[16:48, 40:56] = 1, 2, 3
    feats = torch.zeros(4, 8, 8)  # stride 8: what a CNN says of each cell
    feats[0] = 1.0
    feats[:, 2:6, 1:3] = torch.tensor([0.0, 1.0, 0.0, 0.0])[:, None, None]  # A's two parts look alike
    feats[:, 2:6, 5:7] = torch.tensor([0.0, 0.0, 1.0, 0.0])[:, None, None]
    objectness = 0.4 * (feats[1] + feats[2])  # the objects' cells stand out
    masks, quality, weights = grouped_segments(seg, feats, objectness, max_area_frac=1.0)
    assert masks.dtype == torch.bool and masks.shape[1:] == (64, 64) and weights.shape[1:] == (8, 8)
    assert torch.all(quality[:-1] >= quality[1:])  # best first
    groups = [sorted(set(seg[m.numpy()].tolist())) for m in masks]
    assert groups[:2] == [[3], [1, 2]] or groups[:2] == [[1, 2], [3]]  # B, and A whole, before A's parts
    assert quality[groups.index([1])] < quality[groups.index([1, 2])]
    assert quality[groups.index([0])] == 0  # the background: no contrast, and it touches four sides
    assert quality[groups.index([0, 1, 2, 3])] < quality[1] / 2  # everything at once: little contrast, four sides
    assert grouped_segments(np.zeros((64, 64), dtype=np.int64), feats, objectness)[0].shape[0] == 0  # one segment
