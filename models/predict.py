"""Post-processing: raw model outputs -> per-instance COCO results at the original image size.

Detections (the common format both architectures produce, per image):
    {"masks": [K,h,w] float probabilities covering the resized (unpadded) image at any
     resolution, "scores": [K], "labels": [K] contiguous class indices}
"""

from __future__ import annotations

import math

import numpy as np
import torch.nn.functional as F
from pycocotools import mask as mask_utils


def knet_detections(outputs: dict, input_sizes: list[tuple[int, int]], max_per_image: int) -> list[dict]:
    """K-Net inference (method.md §5.5): last stage, top-k over N kernels x K classes, no NMS.

    outputs["stages"][-1]: masks [B,N,h8,w8] logits, logits [B,N,K]. Masks are upsampled x2
    to stride 4, cropped to each image's unpadded area, and returned as probabilities.
    """
    last = outputs["stages"][-1]
    masks = F.interpolate(last["masks"], scale_factor=2, mode="bilinear", align_corners=False)
    scores_all = last["logits"].sigmoid()
    n, k = scores_all.shape[1:]
    dets = []
    for b, (h, w) in enumerate(input_sizes):
        scores, idx = scores_all[b].flatten().topk(min(max_per_image, n * k))
        kernel, label = idx // k, idx % k
        crop = masks[b, :, : math.ceil(h / 4), : math.ceil(w / 4)]
        dets.append({"masks": crop[kernel].sigmoid(), "scores": scores, "labels": label})
    return dets


def encode_masks(binary: np.ndarray) -> list[dict]:
    """[K,H,W] bool -> K compressed RLEs with str counts (JSON-ready)."""
    if binary.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


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
    from models.masks import mask_to_polygons

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
