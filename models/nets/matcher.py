"""Hungarian assignment between kernels and ground-truth instances (K-Net's MaskHungarianAssigner).

Only computes the assignment; losses live in criterion.py. Cost = focal 2 + dice 4 + mask 1
(method.md §4.2): the focal term is skipped when there are no class scores (initial
kernels and stage 0, which is matched with the initial kernels' masks).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

Assignment = tuple[torch.Tensor, torch.Tensor]  # (kernel indices [M], target indices [M]), int64


def focal_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """[N,K] logits, [G] labels -> [N,G]: focal loss of predicting each GT class, minus that of not."""
    p = logits.sigmoid()
    neg = (1 - alpha) * p.pow(gamma) * -(1 - p + 1e-12).log()
    pos = alpha * (1 - p).pow(gamma) * -(p + 1e-12).log()
    return (pos - neg)[:, labels]


def dice_cost(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """[N,P] probabilities, [G,P] soft targets -> [N,G] negative (squared-form) dice."""
    num = 2 * pred @ target.T
    den = pred.pow(2).sum(-1)[:, None] + target.pow(2).sum(-1)[None, :] + 2 * eps
    return -num / den


def mask_cost(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N,P] probabilities, [G,P] soft targets -> [N,G] negative mean pixel agreement."""
    agree = pred @ target.T + (1 - pred) @ (1 - target).T
    return -agree / pred.shape[-1]


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float = 2.0, cost_dice: float = 4.0, cost_mask: float = 1.0) -> None:
        super().__init__()
        self.cost_class, self.cost_dice, self.cost_mask = cost_class, cost_dice, cost_mask

    @torch.no_grad()
    def forward(
        self,
        masks: torch.Tensor,
        logits: torch.Tensor | None,
        targets: list[dict[str, torch.Tensor]],
        k: int = 1,
    ) -> list[Assignment]:
        """Assign each image's targets to kernels: one-to-one (k = 1), or one-to-many (k > 1).

        masks: [B,N,H,W] mask logits at the targets' resolution; logits: [B,N,K] or None;
        targets[b]["masks"]: [G_b,H,W] soft masks in [0,1], targets[b]["labels"]: [G_b].
        One-to-many (H-DETR's hybrid matching): each target takes its k cheapest kernels, and a
        kernel wanted by several targets goes to the cheapest of them; more kernels learn from
        each object early in training, and the final stage stays one-to-one to keep one answer.
        Returns per image (kernel_idx, target_idx) on the masks' device, sorted by kernel index; empty
        when G_b = 0.
        """
        out: list[Assignment] = []
        for b, tgt in enumerate(targets):
            g = tgt["labels"].shape[0]
            if g == 0:
                empty = torch.empty(0, dtype=torch.int64, device=masks.device)
                out.append((empty, empty.clone()))
                continue
            pred = masks[b].flatten(1).float().sigmoid()
            tmask = tgt["masks"].flatten(1).float()
            cost = self.cost_dice * dice_cost(pred, tmask) + self.cost_mask * mask_cost(pred, tmask)
            if logits is not None and self.cost_class:
                cost = cost + self.cost_class * focal_cost(logits[b].float(), tgt["labels"])
            if k > 1:
                out.append(_one_to_many(cost, k))
                continue
            # the cost matrix stays on the model's device until here: scipy's solver needs it on the host
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64, device=masks.device),
                        torch.as_tensor(cols, dtype=torch.int64, device=masks.device)))
        return out


def _one_to_many(cost: torch.Tensor, k: int) -> Assignment:
    """cost [N,G] -> each target's k cheapest kernels, every kernel given to one target at most."""
    n, g = cost.shape
    top = cost.topk(min(k, n), dim=0, largest=False).indices  # [k,G] kernel indices
    wanted = torch.zeros(n, g, dtype=torch.bool, device=cost.device)
    wanted[top, torch.arange(g, device=cost.device).expand_as(top)] = True
    masked = cost.masked_fill(~wanted, float("inf"))
    best_cost, best_target = masked.min(dim=1)
    rows = torch.nonzero(torch.isfinite(best_cost)).flatten()
    return rows, best_target[rows]


def build_matcher(cost_class: float = 2.0, cost_dice: float = 4.0, cost_mask: float = 1.0) -> HungarianMatcher:
    return HungarianMatcher(cost_class, cost_dice, cost_mask)
