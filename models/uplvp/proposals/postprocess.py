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


def grouped_segments(segments: np.ndarray, features: torch.Tensor, objectness: torch.Tensor,
                     min_area_frac: float = 0.005, max_area_frac: float = 0.6
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Objects as groups of colour segments, merged bottom-up by feature similarity (selective search's
    hierarchical grouping, on CNN features instead of colour histograms).

    segments: int [H, W] labels 0..S-1 (Felzenszwalb at the input resolution, H and W multiples of the
    grid); features: [C, h, w] (the same image at stride H / h). A segment's feature is the mean of the
    cells under it. Adjacent regions are merged most-similar first (cosine of their features, plus a
    bonus for small regions so that parts join before wholes); every segment and every merge is a
    candidate. An object whose parts differ in colour (a bottle's cap, label and body) is one of the
    groups even though no single segment or feature threshold holds it. Hundreds of groups per photo hold most objects
    (balloon, bottles: 50-90 % of them at IoU >= 0.5), so the ranking decides: a candidate's quality is
    its objectness contrast (`objectness` [h, w] in [0, 1], e.g. the normalised feature energy: its mean
    under the candidate minus its mean elsewhere, doubled, in [0, 1]), times its solidity (area over
    its convex hull's) and a factor for the sides of the photo it touches (1 for one or none, -1/4 for
    each more: walls, tables and the sky touch several).
    Returns (masks bool [K, H, W], quality [K], cell weights [K, h, w] for pooling features), candidates
    covering min_area_frac..max_area_frac of the image, best first.
    """
    import cv2
    import heapq

    _, h, w = features.shape
    H, W = segments.shape
    n = int(segments.max()) + 1
    empty = (torch.zeros(0, H, W, dtype=torch.bool), torch.zeros(0), torch.zeros(0, h, w))
    if n < 2:
        return empty
    seg = torch.from_numpy(segments.astype(np.int64))
    cell = (torch.arange(H)[:, None] * h // H) * w + (torch.arange(W)[None, :] * w // W)  # [H, W] grid cell
    overlap = torch.bincount((seg * (h * w) + cell).flatten(), minlength=n * h * w).view(n, h * w).float()
    size = overlap.sum(1)  # pixels per segment
    feat = F.normalize(overlap @ features.flatten(1).T.float() / size[:, None].clamp(min=1), dim=1)  # [n, C]
    pairs = torch.cat([torch.stack([seg[:, :-1].flatten(), seg[:, 1:].flatten()], 1),
                       torch.stack([seg[:-1].flatten(), seg[1:].flatten()], 1)])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]].sort(1).values.unique(dim=0).tolist()

    total = float(H * W)
    members: dict[int, list[int]] = {i: [i] for i in range(n)}  # the live regions: segments, then merges
    sizes = {i: float(size[i]) for i in range(n)}
    fsum = {i: feat[i] * sizes[i] for i in range(n)}  # size-weighted, so a merge's feature is the pixel mean
    nbrs: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in pairs:
        nbrs[a].add(b)
        nbrs[b].add(a)

    def sim(a: int, b: int) -> float:
        cos = float(F.cosine_similarity(fsum[a], fsum[b], dim=0))
        return cos + (1.0 - (sizes[a] + sizes[b]) / total)

    heap = [(-sim(a, b), a, b) for a, b in pairs]
    heapq.heapify(heap)
    out = [[i] for i in range(n) if min_area_frac <= sizes[i] / total <= max_area_frac]  # segments, then merges
    nxt = n
    while heap:
        _, a, b = heapq.heappop(heap)
        if a not in members or b not in members:  # merged into another region since it was pushed
            continue
        new = nxt
        nxt += 1
        members[new] = members.pop(a) + members.pop(b)
        sizes[new] = sizes.pop(a) + sizes.pop(b)
        fsum[new] = fsum.pop(a) + fsum.pop(b)
        nbrs[new] = (nbrs.pop(a) | nbrs.pop(b)) - {a, b}
        for m in nbrs[new]:
            nbrs[m] -= {a, b}
            nbrs[m].add(new)
            heapq.heappush(heap, (-sim(new, m), new, m))
        if min_area_frac <= sizes[new] / total <= max_area_frac:
            out.append(members[new])
    if not out:
        return empty
    member = torch.zeros(len(out), n)
    for k, ids in enumerate(out):
        member[k, ids] = 1.0
    masks = member.bool()[:, seg]  # [K, H, W]
    weights = (member @ overlap) / (overlap.sum(0).clamp(min=1))  # [K, h*w]: the share of each cell covered
    obj = objectness.flatten().float()
    inside = (weights @ obj) / weights.sum(1).clamp(min=1e-6)
    outside = ((1 - weights) @ obj) / (1 - weights).sum(1).clamp(min=1e-6)
    sides = (masks[:, 0, :].any(1).float() + masks[:, -1, :].any(1).float() + masks[:, :, 0].any(1).float()
             + masks[:, :, -1].any(1).float())
    solidity = []
    for m in masks.numpy().astype(np.uint8):
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        hull = cv2.contourArea(cv2.convexHull(np.concatenate(contours)))
        solidity.append(min(1.0, float(m.sum()) / max(1.0, hull)))
    quality = (2 * (inside - outside)).clamp(0, 1) * torch.tensor(solidity) * (1 - 0.25 * (sides - 1).clamp(min=0))
    # best first; among equals (a saturated contrast) the larger, so that a whole goes before its parts
    order = torch.from_numpy(np.lexsort((-masks.flatten(1).sum(1).numpy(), -quality.numpy())))
    return masks[order], quality[order], weights.view(-1, h, w)[order]


def normalise01(x: torch.Tensor) -> torch.Tensor:
    """Min-max scale a tensor to [0, 1] (constant input -> zeros)."""
    return (x - x.min()) / (x.max() - x.min()).clamp(min=1e-6)
