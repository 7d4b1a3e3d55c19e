"""K-Net set-prediction losses (method.md §4.1), DETR style: losses looked up by name, weights in a dict.

Losses are computed at stride 4: stride-8 predictions are upsampled x2 (stride-4 ones, the last
stage's with ModelConfig.mask_stride 4, are used as they are), targets are resized (anti-aliased,
kept soft) to the same grid. The mask losses upsample only the matched kernels' masks.

Initial kernels: BCE 1, dice 4 on matched masks + semantic focal 1 (+ centre focal 1 when the
kernels start from predicted object centres, ModelConfig.kernel_init "centers").
Each stage s:    focal cls 2, BCE 1, dice 4; matched with stage s-1's detached predictions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from models.nets.matcher import Assignment, HungarianMatcher

DEFAULT_WEIGHTS: dict[str, float] = {
    "init_bce": 1.0,
    "init_dice": 4.0,
    "sem_seg": 1.0,
    "center": 1.0,
    "cls": 2.0,
    "bce": 1.0,
    "dice": 4.0,
}


def dice_loss(pred_logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """[P,H,W] logits, [P,H,W] soft targets -> mean over P of 1 - 2Σpt / (Σp² + Σt² + 2eps)."""
    p = pred_logits.flatten(1).sigmoid()
    t = target.flatten(1)
    num = 2 * (p * t).sum(-1)
    den = p.pow(2).sum(-1) + t.pow(2).sum(-1) + 2 * eps
    return (1 - num / den).mean()


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Stride-8 logits [B,*,h,w] -> stride-4 [B,*,2h,2w] (K-Net's mask_upsample_stride=2)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def at_stride4(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask logits [B,N,h,w] at stride 8 or already at stride 4 (ModelConfig.mask_stride 4) -> [B,N,*size]."""
    return masks if tuple(masks.shape[-2:]) == tuple(size) else upsample2(masks)


def resize_targets(targets: list[dict], size: tuple[int, int]) -> list[dict]:
    """Resize each target's uint8 masks [G,Hp,Wp] to soft float masks [G,*size]."""
    out = []
    for t in targets:
        m = t["masks"]
        if m.shape[0]:
            m = F.interpolate(m[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        else:
            m = m.new_zeros((0, *size), dtype=torch.float32)
        out.append({"masks": m.clamp_(0, 1), "labels": t["labels"]})
    return out


def center_targets(targets: list[dict], num_classes: int, size: tuple[int, int]) -> torch.Tensor:
    """Per-class object-centre heat maps [B,K,h,w] at the kernels' grid (stride 8); with
    num_classes 1, one class-agnostic map of every object's centre.

    Each object gives a Gaussian around its mask's centre of mass (sigma 0.3 x the mask's spread
    on each axis, TTFNet's elliptical shape), multiplied by the mask itself so the peak lies on the
    object even when it is not convex, and scaled so its best cell is exactly 1: the one positive
    cell of CenterNet's focal loss. targets: stride-4 soft masks (resize_targets) of size 2h x 2w.
    """
    h, w = size
    device = targets[0]["masks"].device if targets else None  # the masks' device (CPU or CUDA)
    out = torch.zeros(len(targets), num_classes, h, w, device=device)
    yy = torch.arange(h, dtype=torch.float32, device=device)[:, None].expand(h, w)
    xx = torch.arange(w, dtype=torch.float32, device=device)[None, :].expand(h, w)
    for b, t in enumerate(targets):
        if not t["labels"].numel():
            continue
        m = F.avg_pool2d(t["masks"][:, None].float(), 2)[:, 0, :h, :w]  # [G,h,w]
        mass = m.flatten(1).sum(1).clamp(min=1e-6)[:, None, None]
        cy, cx = (m * yy).sum((1, 2), keepdim=True) / mass, (m * xx).sum((1, 2), keepdim=True) / mass
        sy = ((m * (yy - cy) ** 2).sum((1, 2), keepdim=True) / mass).sqrt().mul(0.3).clamp(min=0.5)
        sx = ((m * (xx - cx) ** 2).sum((1, 2), keepdim=True) / mass).sqrt().mul(0.3).clamp(min=0.5)
        heat = torch.exp(-((yy - cy) ** 2) / (2 * sy**2) - ((xx - cx) ** 2) / (2 * sx**2)) * m
        heat = heat / heat.flatten(1).amax(1).clamp(min=1e-6)[:, None, None]
        for g, label in enumerate(t["labels"].tolist()):
            c = label if num_classes > 1 else 0
            out[b, c] = torch.maximum(out[b, c], heat[g])
    return out


def center_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss: [B,K,h,w] logits and heat maps -> scalar.

    Cells at 1 are positives; the others are negatives whose weight (1 - target)^4 fades near
    a centre. Normalised by the number of objects.
    """
    pos = target >= 1.0 - 1e-4
    p = logits.sigmoid()
    pos_loss = F.logsigmoid(logits) * (1 - p) ** 2
    neg_loss = F.logsigmoid(-logits) * p**2 * (1 - target) ** 4
    return -(pos_loss[pos].sum() + neg_loss[~pos].sum()) / max(int(pos.sum()), 1)


def _gather(masks: torch.Tensor, targets: list[dict], assign: list[Assignment]) -> tuple[torch.Tensor, torch.Tensor]:
    """Matched predictions and targets across the batch: ([P,H,W], [P,H,W]) at the targets' stride 4.

    masks [B,N,h,w] at stride 8 (or 4): only the P matched ones are upsampled. Bilinear
    upsampling acts on each mask alone, so this is the loss of upsampling all N and then
    picking, without the forward and backward of the N - P masks no loss reads.
    """
    preds = torch.cat([masks[b, k] for b, (k, _) in enumerate(assign)])
    tgts = torch.cat([targets[b]["masks"][g] for b, (_, g) in enumerate(assign)])
    return at_stride4(preds[None], tuple(tgts.shape[-2:]))[0], tgts


class SetCriterion(nn.Module):
    """Computes every K-Net loss for one forward pass.

    forward(outputs, targets) -> {name: unweighted loss}; names are "init_bce", "init_dice",
    "sem_seg" and "s{i}_cls", "s{i}_bce", "s{i}_dice" for each stage i. `total()` weights
    and sums them with `weight_dict` (keyed by the name without its "s{i}_" prefix).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 one_to_many: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        # k > 1: the initial kernels and every stage but the last are matched one-to-many (k kernels
        # per object, H-DETR); the last stage, whose answer is the prediction, stays one-to-one
        self.one_to_many = one_to_many
        self.weight_dict = dict(weight_dict)
        self.loss_fns: dict[str, Callable[..., torch.Tensor]] = {
            "cls": self.loss_cls,
            "bce": self.loss_bce,
            "dice": self.loss_dice,
            "sem_seg": self.loss_sem_seg,
            "center": self.loss_center,
        }

    # --- individual losses: (predictions, soft targets at stride 4, assignment) -> scalar ---
    def loss_cls(self, logits: torch.Tensor, targets: list[dict], assign: list[Assignment], num_pos: int) -> torch.Tensor:
        """Sigmoid focal over all B*N*K scores; unmatched kernels have an all-zero target."""
        onehot = torch.zeros_like(logits)
        for b, (k, g) in enumerate(assign):
            onehot[b, k, targets[b]["labels"][g]] = 1.0
        return sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0, reduction="sum") / max(num_pos, 1)

    def loss_bce(self, masks: torch.Tensor, targets: list[dict], assign: list[Assignment], num_pos: int) -> torch.Tensor:
        if num_pos == 0:
            return masks.sum() * 0.0
        pred, tgt = _gather(masks, targets, assign)
        return F.binary_cross_entropy_with_logits(pred, tgt)

    def loss_dice(self, masks: torch.Tensor, targets: list[dict], assign: list[Assignment], num_pos: int) -> torch.Tensor:
        if num_pos == 0:
            return masks.sum() * 0.0
        pred, tgt = _gather(masks, targets, assign)
        return dice_loss(pred, tgt)

    def loss_sem_seg(self, seg: torch.Tensor, targets: list[dict], assign: list[Assignment], num_pos: int) -> torch.Tensor:
        """Sigmoid focal on the [B,K,H,W] semantic map; a pixel's target is the class of any
        matched GT covering it, normalised by the number of foreground pixels."""
        target = torch.zeros_like(seg)
        for b, (_, g) in enumerate(assign):
            for gi in g.tolist():
                label = int(targets[b]["labels"][gi])
                target[b, label] = torch.maximum(target[b, label], (targets[b]["masks"][gi] > 0).float())
        num_fg = int(target.amax(1).sum().item())
        return sigmoid_focal_loss(seg, target, alpha=0.25, gamma=2.0, reduction="sum") / max(num_fg, 1)

    def loss_center(self, centers: torch.Tensor, targets: list[dict], assign: list[Assignment], num_pos: int) -> torch.Tensor:
        """Centre focal on the [B,1,h,w] (or per-class [B,K,h,w]) centre map over every object, matched or not."""
        k, size = centers.shape[1], (centers.shape[-2], centers.shape[-1])
        return center_focal_loss(centers, center_targets(targets, k, size).to(centers))

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """outputs: KNet outputs (stride-8 logits); targets[b]: {"masks": uint8 [G,Hp,Wp], "labels": [G]}."""
        init_masks = outputs["init_masks"]
        size = (2 * init_masks.shape[-2], 2 * init_masks.shape[-1])  # stride 4
        soft = resize_targets(targets, size)
        losses: dict[str, torch.Tensor] = {}

        # The matcher sees every kernel's mask at stride 4 (detached: no backward through it);
        # the mask losses upsample only the matched ones (_gather).
        init_up = upsample2(init_masks.detach())
        assign = self.matcher(init_up, None, soft, self.one_to_many)
        num_pos = sum(len(k) for k, _ in assign)
        losses["init_bce"] = self.loss_fns["bce"](init_masks, soft, assign, num_pos)
        losses["init_dice"] = self.loss_fns["dice"](init_masks, soft, assign, num_pos)
        losses["sem_seg"] = self.loss_fns["sem_seg"](upsample2(outputs["sem_seg"]), soft, assign, num_pos)
        if "centers" in outputs:
            losses["center"] = self.loss_fns["center"](outputs["centers"], soft, assign, num_pos)

        # Stage s is assigned with stage s-1's (detached) predictions; stage 0 with the
        # initial kernels' masks and no class scores (K-Net, post_assign=False).
        prev_masks, prev_logits = init_up, None
        for i, stage in enumerate(outputs["stages"]):
            masks = stage["masks"]  # stride 8, or 4 for the last stage with mask_stride 4
            last = i == len(outputs["stages"]) - 1
            assign = self.matcher(prev_masks, prev_logits, soft, 1 if last else self.one_to_many)
            num_pos = sum(len(k) for k, _ in assign)
            losses[f"s{i}_cls"] = self.loss_fns["cls"](stage["logits"], soft, assign, num_pos)
            losses[f"s{i}_bce"] = self.loss_fns["bce"](masks, soft, assign, num_pos)
            losses[f"s{i}_dice"] = self.loss_fns["dice"](masks, soft, assign, num_pos)
            prev_masks, prev_logits = at_stride4(masks.detach(), size), stage["logits"].detach()
        return losses

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum; "s{i}_name" uses weight_dict["name"]."""
        return sum(self.weight_dict[name.split("_", 1)[1] if name[0] == "s" and name[1].isdigit() else name] * v
                   for name, v in losses.items())


def build_criterion(num_classes: int, weight_dict: dict[str, float] | None = None, one_to_many: int = 1) -> SetCriterion:
    from models.nets.matcher import build_matcher

    return SetCriterion(num_classes, build_matcher(), weight_dict or DEFAULT_WEIGHTS, one_to_many)
