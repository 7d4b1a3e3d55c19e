"""One training loop for fine-tuning (and, later, pre-training), readable top to bottom.

AdamW (backbone lr x backbone_lr_mult), linear warm-up, step decay x0.1 at fractions of
the run, gradient clipping, seeds; per-epoch history with losses, throughput and (with a
val set) COCO mask AP; checkpoints that can be resumed exactly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.checkpoint import save_checkpoint
from models.config import ModelConfig, TrainConfig


@dataclass
class TrainHooks:
    """Callbacks for callers that need progress or cancellation (CLI, Celery worker)."""

    on_step: Callable[[int, int, int, dict[str, float]], None] | None = None  # (epoch, step, steps, losses)
    on_epoch: Callable[[dict[str, Any]], None] | None = None  # the epoch's history entry
    should_stop: Callable[[], bool] | None = None  # checked every step
    progress: bool = True  # tqdm bars


class TrainingCancelled(Exception):
    """Raised when `should_stop` returns True; the last checkpoint stays valid."""


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the backbone at lr * backbone_lr_mult (frozen parameters are left out)."""
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "rest": []}
    for p in model.parameters():
        if p.requires_grad:
            groups["backbone" if id(p) in backbone_ids else "rest"].append(p)
    params = [{"params": groups["rest"], "lr_mult": 1.0}]
    if groups["backbone"]:
        params.append({"params": groups["backbone"], "lr_mult": cfg.backbone_lr_mult})
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt


def lr_at(step: int, epoch: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """Learning rate for an optimizer step: linear warm-up, then x0.1 at each step epoch.

    Given the run's `total_steps`, the warm-up is capped at a quarter of them: 20 images for
    12 epochs is 120 steps, and a 100-step warm-up would leave nothing trained at full lr.
    """
    lr = cfg.lr * (0.1 ** sum(epoch >= max(1, round(f * cfg.epochs)) for f in cfg.lr_steps if f < 1))
    warmup = min(cfg.warmup_iters, total_steps // 4) if total_steps is not None else cfg.warmup_iters
    if step < warmup:
        lr *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * step / warmup
    return lr


def train(
    model: nn.Module,
    train_set: torch.utils.data.Dataset,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    categories: list[dict],
    out: str | Path | None = None,
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
    resume: dict[str, Any] | None = None,
    hooks: TrainHooks | None = None,
    extra: dict[str, Any] | None = None,
    step_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]] | None = None,
) -> TrainState:
    """Train `model` for cfg.epochs epochs (continuing from `resume`, a loaded checkpoint).

    `evaluate(model) -> metrics` runs every cfg.eval_every epochs; its "segm"/"class_agnostic"
    numbers go into the history. `step_fn(model, batch) -> losses` overrides the default
    ``model.compute_losses(batch.images, batch.targets)`` (pre-training adds prompts).
    Checkpoints go to `out` every cfg.checkpoint_every epochs and at the end.
    """
    from models.data import make_loader

    cfg.validate()
    hooks = hooks or TrainHooks()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    opt = build_optimizer(model, cfg)
    state = TrainState()
    if resume is not None:
        model.load_state_dict(resume["model"])
        if resume.get("optimizer"):
            opt.load_state_dict(resume["optimizer"])
        state = TrainState(resume["epoch"], resume["step"], list(resume["history"]))
    step_fn = step_fn or (lambda m, b: m.compute_losses(b.images, b.targets))
    trainable = [p for g in opt.param_groups for p in g["params"]]

    def checkpoint() -> None:
        if out is not None:
            save_checkpoint(out, model, model_cfg, cfg, categories, state.history, opt, state.epoch, state.step, extra)

    while state.epoch < cfg.epochs:
        epoch = state.epoch
        # Per-epoch seeding makes shuffling and augmentation identical whether a run
        # goes straight through or is resumed from a checkpoint.
        seed_everything(cfg.seed * 1000 + epoch)
        loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch)
        model.train()
        sums: dict[str, float] = {}
        n_images, t0 = 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not hooks.progress, leave=False)
        for i, batch in enumerate(bar):
            if hooks.should_stop and hooks.should_stop():
                raise TrainingCancelled(f"cancelled in epoch {epoch + 1}, step {i}")
            lr = lr_at(state.step, epoch, cfg, cfg.epochs * len(loader))
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
            losses = step_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            state.step += 1
            n_images += batch.images.shape[0]
            scalars = {k: float(v.detach()) for k, v in losses.items()}
            for k, v in scalars.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{scalars['loss']:.3f}", lr=f"{lr:.1e}")
            if hooks.on_step:
                hooks.on_step(epoch, i, len(loader), scalars)
        elapsed = time.perf_counter() - t0
        steps = max(1, len(loader))
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": sums.get("loss", 0.0) / steps,
            "losses": {k: v / steps for k, v in sums.items() if k != "loss"},
            "lr": lr_at(state.step, epoch, cfg, cfg.epochs * len(loader)),
            "train_time_s": elapsed,
            "images_per_s": n_images / elapsed if elapsed > 0 else 0.0,
        }
        state.epoch += 1
        if evaluate is not None and (state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs):
            metrics = evaluate(model)
            entry.update({k: metrics["segm"][k] for k in ("AP", "AP50", "AP75")})
            entry["agnostic_AP"] = metrics["class_agnostic"]["AP"]
            entry["agnostic_AP50"] = metrics["class_agnostic"]["AP50"]
        state.history.append(entry)
        if hooks.on_epoch:
            hooks.on_epoch(entry)
        if state.epoch % cfg.checkpoint_every == 0 or state.epoch == cfg.epochs:
            checkpoint()
    return state
