"""Turning dense maps into a few de-duplicated instance masks; shared by all engines.

Three generators; the first two from method.md §2:
  * `components_per_class` (option A): per-class confident regions split into connected components;
  * `self_similarity_masks` (option B, FreeMask): each query position's cosine similarity to all
    positions, min-max normalised, is a soft mask of "the thing this position belongs to";
  * `normalized_cut_masks` (the MaskCut idea of CutLER): repeated normalized cuts of the patch
    affinity graph, each cut's foreground one object (and its connected parts);
and the de-duplication both need: Gaussian Matrix NMS (SOLOv2, models.engine.predict) and a greedy IoU cut.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from models.engine.predict import mask_iou


def greedy_dedupe(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float, k: int) -> list[int]:
    """Indices of at most `k` masks, best score first, none overlapping a kept one above `iou_threshold`."""
    keep: list[int] = []
    for i in scores.argsort(descending=True).tolist():
        if len(keep) >= k:
            break
        if keep and mask_iou(masks[i : i + 1], masks[keep]).max() > iou_threshold:
            continue
        keep.append(i)
    return keep


def self_similarity_masks(
    features: torch.Tensor, scales: tuple[float, ...] = (1.0, 0.5, 0.25), threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeMask class-agnostic proposals from one image's dense features.

    features: [C, h, w]. Queries are the features resized by each factor in `scales`; each
    query's cosine similarity to every position, min-max normalised per query, is a soft mask.
    Returns (soft [Q, h, w] in [0, 1], maskness [Q]) where maskness is the mean soft value
    inside the binarised mask (soft >= threshold); masks of <= 1 cell get maskness 0.
    """
    c, h, w = features.shape
    keys = F.normalize(features.flatten(1), dim=0)  # [C, h*w]
    queries = []
    for s in scales:
        qh, qw = max(1, round(h * s)), max(1, round(w * s))
        q = features if (qh, qw) == (h, w) else F.interpolate(features[None], (qh, qw), mode="bilinear",
                                                               align_corners=False)[0]
        queries.append(q.flatten(1))
    q = F.normalize(torch.cat(queries, 1), dim=0)  # [C, Q]
    sim = q.T @ keys  # [Q, h*w]
    lo, hi = sim.min(1, keepdim=True).values, sim.max(1, keepdim=True).values
    soft = (sim - lo) / (hi - lo).clamp(min=1e-6)
    binary = soft >= threshold
    area = binary.sum(1)
    maskness = (soft * binary).sum(1) / area.clamp(min=1)
    maskness[area <= 1] = 0
    return soft.view(-1, h, w), maskness


def _top2_eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two largest eigenpairs of a symmetric [N, N] matrix, ascending: ([2], [N, 2]).

    Lanczos (ARPACK) for large graphs: a full eigendecomposition of ~1200 patches costs about a
    second on 2 threads, the two top pairs a few matrix-vector products. The start vector is fixed,
    so proposals are deterministic."""
    n = m.shape[0]
    if n <= 64:
        evals, evecs = torch.linalg.eigh(m)
        return evals[-2:], evecs[:, -2:]
    from scipy.sparse.linalg import eigsh

    evals, evecs = eigsh(m.double().numpy(), k=2, which="LA", v0=np.ones(n), tol=1e-6)
    order = np.argsort(evals)
    return torch.from_numpy(evals[order]).float(), torch.from_numpy(evecs[:, order]).float()


def normalized_cut_masks(
    features: torch.Tensor, cuts: int = 3, tau: float = 0.2, min_cells: int = 2
) -> list[tuple[np.ndarray, float]]:
    """Foreground objects from repeated normalized cuts of one image's patch graph (MaskCut-style).

    features: [C, h, w]. Patches are nodes; two patches are linked (weight 1) when their cosine
    similarity exceeds `tau`, else weakly (1e-5), so the graph stays connected. Each of `cuts`
    rounds bipartitions the patches still in play by the second eigenvector of the normalised
    affinity (Shi & Malik's relaxation), calls the side holding the eigenvector's largest entry the
    object unless it holds most of the border (objects rarely fill a photo's edges), and takes that
    side out of the graph for the next round. Each object is returned whole and, when it falls
    apart, as its 8-connected parts of at least `min_cells` cells, since one cut on dense data
    (nuclei, insects) often gathers many similar instances at once.
    Returns [(bool mask [h, w], quality in [0, 1])]; quality is 1 - the cut's normalised-Laplacian
    eigenvalue (near 1 for a clean cut between two barely linked sides), times sqrt(part share) for
    parts.
    """
    c, h, w = features.shape
    f = F.normalize(features.flatten(1).T.float(), dim=1)  # [N, C]
    affinity = torch.where(f @ f.T > tau, 1.0, 1e-5)  # [N, N]
    border = np.zeros((h, w), dtype=bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    border_t = torch.from_numpy(border.ravel())
    active = torch.ones(h * w, dtype=torch.bool)
    structure = np.ones((3, 3), dtype=bool)
    out: list[tuple[np.ndarray, float]] = []
    for _ in range(cuts):
        idx = active.nonzero().squeeze(1)
        if len(idx) < 2 * min_cells:
            break
        a = affinity[idx][:, idx]
        d_isqrt = a.sum(1).rsqrt()
        evals, evecs = _top2_eigh(d_isqrt[:, None] * a * d_isqrt[None, :])
        # the largest eigenvalue of D^-1/2 A D^-1/2 is 1 (the trivial vector); the second gives the cut
        v = evecs[:, -2] * d_isqrt  # the generalised eigenvector of (D - A) v = lambda D v
        side = v > v.mean()
        if not side[v.abs().argmax()]:
            side = ~side
        on_border = border_t[idx]
        if on_border.any() and (side & on_border).sum() * 2 > on_border.sum():
            side = ~side
        if side.sum() < min_cells:
            break
        quality = float((evals[-2] / evals[-1]).clamp(0, 1))  # evals[-1] is 1 up to rounding
        mask = torch.zeros(h * w, dtype=torch.bool)
        mask[idx[side]] = True
        active &= ~mask
        m = mask.view(h, w).numpy()
        out.append((m, quality))
        labels, n = ndimage.label(m, structure=structure)
        if n > 1:
            areas = np.bincount(labels.ravel(), minlength=n + 1)
            total = areas[1:].sum()
            for j in np.argsort(-areas[1:])[:64] + 1:
                if areas[j] >= min_cells:
                    out.append((labels == j, quality * float(np.sqrt(areas[j] / total))))
    return out


def components_per_class(
    probs: np.ndarray, threshold: float, min_area_frac: float
) -> list[tuple[np.ndarray, int, float]]:
    """Option A: connected components of confident class regions.

    probs: [C, H, W] per-pixel class probabilities. For each class c, the pixels where c is the
    argmax and its probability exceeds `threshold` are split into 8-connected components;
    components smaller than `min_area_frac` of the image are dropped. Returns
    (bool mask [H, W], class index, score = mean probability inside x sqrt(area fraction)).
    """
    c, h, w = probs.shape
    arg = probs.argmax(0)
    top = probs.max(0)
    out = []
    structure = np.ones((3, 3), dtype=bool)
    for k in np.unique(arg[top > threshold]):
        region = (arg == k) & (top > threshold)
        labels, n = ndimage.label(region, structure=structure)
        if n == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for j in range(1, n + 1):
            if areas[j] < min_area_frac * h * w:
                continue
            m = labels == j
            out.append((m, int(k), float(probs[k][m].mean() * np.sqrt(areas[j] / (h * w)))))
    return out


def snap_to_segments(soft: torch.Tensor, segments: np.ndarray, threshold: float) -> torch.Tensor:
    """Snap coarse soft masks to image segments (superpixels): a segment is in a mask when the
    mask's mean soft value over it is >= threshold. Stride-16 features only know roughly where a
    thing is; colour segments know where its edges are.

    soft: [M, H, W] float; segments: int [H, W] labels 0..S-1 -> bool [M, H, W].
    """
    m = soft.shape[0]
    seg = torch.from_numpy(segments.astype(np.int64)).flatten()
    n = int(seg.max()) + 1 if seg.numel() else 0
    sums = torch.zeros(m, n).index_add_(1, seg, soft.flatten(1).float())
    counts = torch.bincount(seg, minlength=n).clamp(min=1)
    inside = (sums / counts) >= threshold  # [M, S]
    return inside[:, seg].view_as(soft)


def level_components(score_map: np.ndarray, levels: tuple[float, ...], min_area: float) -> list[tuple[np.ndarray, float]]:
    """Connected regions of a [H, W] map in [0, 1] at several thresholds (nested, coarse to fine).

    Returns (bool mask [H, W], mean map value inside) for every 8-connected component of
    `score_map >= t`, t in `levels`, with at least `min_area` pixels.
    """
    out = []
    for t in levels:
        labels, n = ndimage.label(score_map >= t, structure=np.ones((3, 3), dtype=bool))
        if n == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for j in range(1, n + 1):
            if areas[j] >= min_area:
                m = labels == j
                out.append((m, float(score_map[m].mean())))
    return out


def normalise01(x: torch.Tensor) -> torch.Tensor:
    """Min-max scale a tensor to [0, 1] (constant input -> zeros)."""
    return (x - x.min()) / (x.max() - x.min()).clamp(min=1e-6)
