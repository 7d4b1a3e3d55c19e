"""Post-processing: mask IoU, Matrix NMS, and K-Net's ranking (mask quality, duplicates decayed)."""

import torch

from models.engine.predict import knet_detections, mask_iou, matrix_nms


def _square(y0, x0, s, size=20):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y0 + s, x0:x0 + s] = True
    return m


def test_mask_iou_values():
    a = torch.stack([_square(0, 0, 10), _square(0, 0, 10)])
    b = torch.stack([_square(0, 0, 10), _square(0, 5, 10), _square(10, 10, 5)])
    iou = mask_iou(a, b)
    assert iou.shape == (2, 3)
    assert iou[0, 0] == 1 and iou[0, 2] == 0
    assert abs(iou[0, 1].item() - 50 / 150) < 1e-6


def test_matrix_nms_decays_a_duplicate_not_a_distinct_mask():
    masks = torch.stack([_square(0, 0, 10), _square(0, 1, 10), _square(12, 12, 6)])
    scores = torch.tensor([0.9, 0.8, 0.7])
    out = matrix_nms(masks, scores)
    assert out[0] == scores[0]  # the best mask is never decayed
    assert out[1] < 0.3 * scores[1]  # near-duplicate of the best
    assert torch.isclose(out[2], scores[2])  # no overlap: untouched


def test_class_aware_matrix_nms_leaves_other_classes_alone():
    masks = torch.stack([_square(0, 0, 10), _square(0, 1, 10)])
    scores = torch.tensor([0.9, 0.8])
    out = matrix_nms(masks, scores, labels=torch.tensor([0, 1]))
    assert torch.equal(out, scores)
    out = matrix_nms(masks, scores, labels=torch.tensor([1, 1]))
    assert out[1] < 0.3 * scores[1]


def _outputs(mask_logits: torch.Tensor, class_logits: torch.Tensor) -> dict:
    return {"stages": [{"masks": mask_logits[None], "logits": class_logits[None]}]}


def test_duplicate_kernels_rank_below_a_second_object():
    """Two kernels on object A (the copy scores 0.85), one on object B (0.7): B must come second."""
    m = torch.full((3, 8, 8), -8.0)
    m[0, :4, :4] = m[1, :4, :4] = 8.0  # A twice
    m[2, 5:, 5:] = 8.0  # B
    logits = torch.logit(torch.tensor([[0.9], [0.85], [0.7]]))
    raw = knet_detections(_outputs(m, logits), [(64, 64)], 3, rescore=False, nms=False)[0]
    assert raw["scores"].tolist() == sorted(raw["scores"].tolist(), reverse=True)
    assert raw["masks"][1][:2, :2].mean() > 0.9  # without NMS, the copy of A is second
    det = knet_detections(_outputs(m, logits), [(64, 64)], 3)[0]
    second = det["masks"][1] > 0.5
    assert second[10:, 10:].all() and not second[:8, :8].any()  # with it, B is second
    assert det["scores"][2] < 0.3 * 0.85  # the copy is decayed


def test_mask_quality_lowers_vague_masks():
    m = torch.full((2, 8, 8), -8.0)
    m[0, :4, :4] = 8.0  # a crisp mask
    m[1, 4:, 4:] = 0.3  # a vague one (probability 0.57 everywhere in it)
    logits = torch.logit(torch.tensor([[0.6], [0.9]]))
    det = knet_detections(_outputs(m, logits), [(64, 64)], 2)[0]
    assert det["masks"][0][:2, :2].mean() > 0.9  # the crisp mask ranks first despite its lower class score
    assert abs(det["scores"][1].item() - 0.9 * torch.sigmoid(torch.tensor(0.3)).item()) < 1e-4
