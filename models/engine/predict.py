"""Post-processing: raw model outputs -> per-instance COCO results at the original image size.

Detections (the common format both architectures produce, per image):
    {"masks": [K,h,w] float probabilities covering the resized (unpadded) image at any
     resolution, "scores": [K], "labels": [K] contiguous class indices}
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from models.data.masks import encode_masks
from models.nets.criterion import at_stride4


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU between two sets of binary masks. a: [M, H, W], b: [N, H, W] (bool/0-1) -> [M, N]."""
    a = a.flatten(1).float()
    b = b.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


def matrix_nms(masks: torch.Tensor, scores: torch.Tensor, sigma: float = 2.0,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian Matrix NMS (SOLOv2): decay each mask's score by its overlap with better masks.

    masks: bool [M, H, W]; scores: [M]; labels: [M] or None -> decayed scores [M] (same order).
    A mask that is mostly covered by a higher-scoring mask loses most of its score, without a
    hard threshold. With `labels`, only masks of the same label suppress each other.
    """
    m = masks.shape[0]
    if m == 0:
        return scores
    order = scores.argsort(descending=True)
    iou = mask_iou(masks[order], masks[order]).triu(diagonal=1)  # iou[i, j]: i better than j
    if labels is not None:
        lab = labels[order]
        iou = iou * (lab[:, None] == lab[None, :])
    # how much each better mask i was itself suppressed (its max IoU with an even better one)
    compensate = iou.max(dim=0).values[:, None].expand(m, m)
    decay = torch.exp(-sigma * (iou**2 - compensate**2)).min(dim=0).values
    out = torch.empty_like(scores)
    out[order] = scores[order] * decay
    return out


def knet_detections(outputs: dict, input_sizes: list[tuple[int, int]], max_per_image: int,
                    mask_threshold: float = 0.5, rescore: bool = True, nms: bool = True) -> list[dict]:
    """K-Net inference (method.md §5.5): last stage, top-k over N kernels x K classes.

    outputs["stages"][-1]: masks [B,N,h8,w8] (or already [B,N,2h8,2w8], ModelConfig.mask_stride 4)
    logits, logits [B,N,K]. Masks are brought to stride 4, cropped to each image's unpadded area,
    and returned as probabilities.

    `rescore` multiplies each class probability by its mask's quality, the mean probability
    inside the binarised mask (Mask2Former): a kernel with a confident class but a vague mask
    ranks below one that is sure of both. `nms` decays duplicates of the same class with Matrix
    NMS: with one or two objects per image, several kernels often find the same one, and
    every copy after the first is a high-scoring false positive.
    """
    last = outputs["stages"][-1]
    h8, w8 = outputs.get("init_masks", last["masks"]).shape[-2:]  # the stride-8 grid
    masks = at_stride4(last["masks"], (2 * h8, 2 * w8))
    scores_all = last["logits"].sigmoid()
    n, k = scores_all.shape[1:]
    dets = []
    for b, (h, w) in enumerate(input_sizes):
        probs = masks[b, :, : math.ceil(h / 4), : math.ceil(w / 4)].sigmoid()  # [N,h4,w4]
        cls = scores_all[b]
        if rescore:
            binary = probs > mask_threshold
            quality = (probs * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp(min=1)
            cls = cls * quality[:, None]
        scores, idx = cls.flatten().topk(min(max_per_image, n * k))
        kernel, label = idx // k, idx % k
        chosen = probs[kernel]
        if nms and len(scores) > 1:
            scores = matrix_nms(chosen > mask_threshold, scores, labels=label)
            order = scores.argsort(descending=True)
            scores, label, chosen = scores[order], label[order], chosen[order]
        dets.append({"masks": chosen, "scores": scores, "labels": label})
    return dets


def detections_to_instances(
    det: dict,
    orig_size: tuple[int, int],
    category_ids: list[int] | tuple[int, ...],
    category_names: list[str] | tuple[str, ...],
    mask_threshold: float = 0.5,
    score_threshold: float = 0.0,
    with_polygons: bool = False,
    chunk: int = 16,
) -> list[dict]:
    """One image's detections -> instances at the original resolution.

    Each instance: {"category_id" (COCO id), "category_name", "score", "bbox" (xywh),
    "segmentation" (RLE), "area", optional "polygons"}. Masks are resized in chunks to
    bound memory (K masks x full resolution can be hundreds of MB).
    """
    from models.data.masks import mask_to_polygons

    keep = det["scores"] >= score_threshold
    probs, scores, labels = det["masks"][keep], det["scores"][keep], det["labels"][keep]
    out: list[dict] = []
    height, width = orig_size
    for start in range(0, probs.shape[0], chunk):
        p = probs[start : start + chunk].float()
        full = F.interpolate(p[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        binary = (full > mask_threshold).cpu().numpy()
        rles = encode_masks(binary)
        boxes = mask_utils.toBbox(rles) if rles else []
        areas = mask_utils.area(rles) if rles else []
        for j, rle in enumerate(rles):
            label = int(labels[start + j])
            inst = {
                "category_id": int(category_ids[label]),
                "category_name": category_names[label],
                "score": float(scores[start + j]),
                "bbox": [float(v) for v in boxes[j]],
                "area": int(areas[j]),
                "segmentation": rle,
            }
            if with_polygons:
                inst["polygons"] = mask_to_polygons(binary[j])
            out.append(inst)
    return out
