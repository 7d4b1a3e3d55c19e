"""UPLVP prompt-kernel matching (method.md §3): pseudo masks -> prompts -> added to kernels.

For each image, each pseudo mask becomes a prompt: the neck's feature averaged over the mask's
tight box (the reference's choice) or over the mask itself, detached. The prompt list is filled
to P slots by the reference's repeat rule and matched to the N initial kernels, either

  fixed   kernel k takes slot floor(k / (N / P)) (the reference README config), or
  cosine  each kernel takes the slot it is most similar to (argmax cosine; many-to-one; the
          paper's "best-matched" prompt, `upknet_cosine.py`),

then 10% of the kernels drop their prompt and the rest add it, once, before the first update
stage. Only pre-training does this: inference and fine-tuning never see prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.errors import ConfigError

MATCHINGS = ("cosine", "fixed", "none")
POOLS = ("box", "mask")
LEVEL_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}


@dataclass
class PromptConfig:
    matching: str = "cosine"  # cosine | fixed | none (pre-train on pseudo masks without prompts)
    num_slots: int = 10  # P: prompt slots per image; pseudo masks beyond P are not used as prompts
    dropout: float = 0.1  # probability that a kernel drops its prompt (per kernel, per image)
    pool: str = "box"  # box (reference) | mask
    level: str = "p5"  # FPN level pooled (reference: P5, stride 32)

    def validate(self, num_kernels: int) -> PromptConfig:
        if self.matching not in MATCHINGS:
            raise ConfigError(f"matching must be one of {', '.join(MATCHINGS)}, got {self.matching!r}")
        if self.pool not in POOLS:
            raise ConfigError(f"prompt pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.level not in LEVEL_STRIDES:
            raise ConfigError(f"prompt level must be one of {', '.join(LEVEL_STRIDES)}, got {self.level!r}")
        if not 1 <= self.num_slots <= num_kernels:
            raise ConfigError(f"num_slots must be in 1..{num_kernels} (the number of kernels), got {self.num_slots}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"prompt dropout must be in [0, 1), got {self.dropout}")
        return self


def fill_slots(n: int, num_slots: int) -> list[int]:
    """Which of an image's n prompts fills each of the P slots (the reference's repeat rule).

    n >= P: the first P. 0 < n < P: each prompt P // n times in a row, then the first P % n once
    more (n = 3, P = 10 -> 0 0 0 1 1 1 2 2 2 0). n = 0: [] (the caller uses zero prompts).
    """
    if n <= 0:
        return []
    if n >= num_slots:
        return list(range(num_slots))
    reps = num_slots // n
    return [i for i in range(n) for _ in range(reps)] + list(range(num_slots % n))


def pool_prompts(feature: torch.Tensor, stride: int, masks: torch.Tensor, boxes: torch.Tensor,
                 pool: str) -> torch.Tensor:
    """One image's prompts. feature [C, h, w] at `stride`; masks [n, H, W] and boxes [n, 4]
    (xyxy) in input pixels -> [n, C], detached."""
    c, h, w = feature.shape
    n = masks.shape[0]
    if n == 0:
        return feature.new_zeros(0, c)
    if pool == "mask":
        m = F.adaptive_avg_pool2d(masks[None].float(), (h, w))[0] if masks.shape[-2:] != (h, w) else masks.float()
        # a mask thinner than a cell still has weight somewhere: area pooling never gives all zeros
        return ((m.flatten(1) @ feature.flatten(1).T) / m.flatten(1).sum(1, keepdim=True).clamp(min=1e-6)).detach()
    out = []
    for x0, y0, x1, y1 in boxes.tolist():
        # box on the feature grid; a box thinner than a cell still covers one
        gx0, gy0 = min(int(x0 // stride), w - 1), min(int(y0 // stride), h - 1)
        gx1, gy1 = max(gx0 + 1, min(math.ceil(x1 / stride), w)), max(gy0 + 1, min(math.ceil(y1 / stride), h))
        out.append(feature[:, gy0:gy1, gx0:gx1].mean((1, 2)))
    return torch.stack(out).detach()


def slot_prompts(prompts: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[n, C] -> [P, C] by `fill_slots` (zeros when n = 0)."""
    idx = fill_slots(prompts.shape[0], num_slots)
    if not idx:
        return prompts.new_zeros(num_slots, prompts.shape[1])
    return prompts[idx]


def fixed_assignment(num_kernels: int, num_slots: int) -> torch.Tensor:
    """Slot of each kernel under `fixed` matching: [N] with kernel k -> floor(k / (N // P)), capped at P-1."""
    per_slot = max(1, num_kernels // num_slots)
    return (torch.arange(num_kernels) // per_slot).clamp(max=num_slots - 1)


@torch.no_grad()
def cosine_assignment(kernels: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Slot of each kernel under `cosine` matching. kernels [B, N, C], slots [B, P, C] -> [B, N]:
    per kernel the argmax cosine similarity over the P slots (several kernels may take one slot)."""
    sim = F.normalize(kernels, dim=-1) @ F.normalize(slots, dim=-1).transpose(1, 2)  # [B, N, P]
    return sim.argmax(-1)


class Prompter:
    """Builds the prompts for one batch; KNet calls it with (FPN levels, initial kernels).

    targets: the batch's pseudo-mask targets (each with "masks" [n, Hp, Wp] and "boxes" [n, 4]
    in input pixels, best pseudo mask first).
    """

    def __init__(self, cfg: PromptConfig, targets: list[dict], training: bool = True) -> None:
        self.cfg = cfg
        self.targets = targets
        self.training = training
        self.last_assignment: torch.Tensor | None = None  # [B, N], for tests and logging

    def __call__(self, pyramid: list[torch.Tensor], kernels: torch.Tensor) -> torch.Tensor:
        """pyramid: FPN levels P2..P5 [B, C, h_l, w_l]; kernels [B, N, C] -> prompts [B, N, C]."""
        cfg = self.cfg
        level = ["p2", "p3", "p4", "p5"].index(cfg.level)
        feature = pyramid[level]
        b, n, c = kernels.shape
        slots = torch.stack([
            slot_prompts(pool_prompts(feature[i], LEVEL_STRIDES[cfg.level], t["masks"], t["boxes"], cfg.pool)
                         [: cfg.num_slots], cfg.num_slots)
            for i, t in enumerate(self.targets)
        ])  # [B, P, C]
        if cfg.matching == "fixed":
            assign = fixed_assignment(n, cfg.num_slots).to(kernels.device).expand(b, n)
        else:
            assign = cosine_assignment(kernels, slots)
        self.last_assignment = assign
        prompts = torch.gather(slots, 1, assign[..., None].expand(b, n, c))
        if self.training and cfg.dropout > 0:
            keep = (torch.rand(b, n, 1, device=kernels.device) >= cfg.dropout).to(prompts.dtype)
            prompts = prompts * keep
        return prompts
