"""One training loop for fine-tuning and pre-training, readable top to bottom.

AdamW (backbone lr x backbone_lr_mult), linear warm-up, step decay x0.1 at fractions of
the run, gradient clipping, seeds; per-epoch history with losses, throughput and (with a
val set) COCO mask AP; checkpoints that can be resumed exactly.

A run is either `epochs` long or fits a time budget (`time_budget_s`): the first steps are
timed, and the run is laid out as `max_steps` steps (warm-up, decay points and evaluations as
fractions of them) so that training and its evaluations end within the budget. With a val set
the weights of the best evaluation are kept (`keep_best`) and a run that stops improving for
`early_stop_patience` evaluations ends early.

The run happens on `cfg.device` (models.engine.device): the model, each batch and its targets
move there; on CUDA the step runs under autocast (bf16, or fp16 with a gradient scaler) and
the loader pins memory in worker processes. Checkpoints are written from CPU copies, so a
model trained on a GPU loads on a CPU and the other way round.
"""

from __future__ import annotations

import dataclasses
import math
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

from models.config import ModelConfig, TrainConfig
from models.engine import device as devices
from models.engine.checkpoint import save_checkpoint


@dataclass
class TrainHooks:
    """Callbacks for callers that need progress or cancellation (CLI, Celery worker)."""

    on_step: Callable[[int, int, int, dict[str, float]], None] | None = None  # (epoch, step, steps, losses)
    on_epoch: Callable[[dict[str, Any]], None] | None = None  # the epoch's history entry
    should_stop: Callable[[], bool] | None = None  # checked every step
    on_evaluation: Callable[[nn.Module, dict[str, Any]], None] | None = None  # (model, metrics) after each evaluation
    # the run's layout: {"epochs", "steps" (0: epochs x steps per epoch), "steps_per_epoch", "time_budget_s"},
    # at the start and again when a budgeted run has timed its first steps
    on_plan: Callable[[dict[str, Any]], None] | None = None
    on_checkpoint: Callable[[Path], None] | None = None  # after each checkpoint is written (its path)
    progress: bool = True  # tqdm bars


class TrainingCancelled(Exception):
    """Raised when `should_stop` returns True; the last checkpoint stays valid."""


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {"epoch", "step", "score", "metrics"} of the best evaluation so far
    best_weights: dict[str, torch.Tensor] | None = None
    stopped: str | None = None  # why the run ended before its plan: "early_stop" | "time_budget"
    config: TrainConfig | None = None  # the run's config as planned (a budgeted run's steps and epochs)


def selection_score(metrics: dict[str, Any]) -> float:
    """The val number a checkpoint is selected on: mask AP, else AP50 (None = no ground truth)."""
    segm = metrics.get("segm", {})
    for key in ("AP", "AP50"):
        if segm.get(key) is not None:
            return float(segm[key])
    return -1.0


PROBE_STEPS = 6  # steps timed before a budgeted run is laid out (the first one, with its warm-up costs, is not counted)


def plan_steps(cfg: TrainConfig, step_s: float, eval_s: float, steps_per_epoch: int, elapsed_s: float,
               steps_done: int, evals_left: int) -> int:
    """The run's total steps: those done, plus what fits in the rest of `cfg.time_budget_s` at
    `step_s` a step once `evals_left` evaluations of `eval_s` each are paid for; capped at
    `cfg.epochs` epochs, and at least one step more than done."""
    left = cfg.time_budget_s - elapsed_s - evals_left * eval_s
    total = steps_done + int(max(0.0, left) / max(step_s, 1e-6))
    return max(steps_done + 1, min(total, cfg.epochs * steps_per_epoch))


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
    if cfg.max_steps:  # a planned run: decay points are fractions of its steps
        total_steps = cfg.max_steps
        lr = cfg.lr * (0.1 ** sum(step >= round(f * cfg.max_steps) for f in cfg.lr_steps if f < 1))
    else:
        lr = cfg.lr * (0.1 ** sum(epoch >= max(1, round(f * cfg.epochs)) for f in cfg.lr_steps if f < 1))
    warmup = min(cfg.warmup_iters, total_steps // 4) if total_steps is not None else cfg.warmup_iters
    if step < warmup:
        lr *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * step / warmup
    return lr


def ema_average(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """torch.optim.swa_utils.AveragedModel's `multi_avg_fn` for an exponential moving average whose decay
    ramps up, min(decay, (1 + t) / (10 + t)) after t updates: a few-hundred-step run must not spend its
    first thousand steps averaging in its random start. Integer buffers are copied."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        t = float(updates)
        d = min(decay, (1.0 + t) / (10.0 + t))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, 1.0 - d)
            else:
                a.copy_(c)

    return update


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
    eval_images: int = 0,
) -> TrainState:
    """Train `model` for cfg.epochs epochs (continuing from `resume`, a loaded checkpoint).

    `evaluate(model) -> metrics` runs every cfg.eval_every epochs; its "segm"/"class_agnostic"
    numbers go into the history. `step_fn(model, batch) -> losses` overrides the default
    ``model.compute_losses(batch.images, batch.targets)`` (pre-training adds prompts).
    Checkpoints go to `out` every cfg.checkpoint_every epochs and at the end. `eval_images`
    (the val set's size) lets a budgeted run reserve time for its evaluations before the first one.
    The returned state's `best` holds the selected evaluation (its "metrics" are `evaluate`'s).
    """
    from models.data.dataset import make_loader

    cfg.validate()
    hooks = hooks or TrainHooks()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = devices.resolve_device(cfg.device)
    devices.configure_backends(device)
    precision = devices.precision_for(device, cfg.amp)
    scaler = devices.grad_scaler(device, precision)
    workers = devices.loader_workers(device, cfg.loader_workers)
    seed_everything(cfg.seed)
    model.to(device)  # before the optimizer is built: its state then lives where the parameters do
    opt = build_optimizer(model, cfg)
    state = TrainState()
    if resume is not None:
        model.load_state_dict(resume["model"])
        if resume.get("optimizer"):
            opt.load_state_dict(resume["optimizer"])
        state = TrainState(resume["epoch"], resume["step"], list(resume["history"]))
        best = (resume.get("extra") or {}).get("best")
        if best:
            state.best, state.best_weights = {k: v for k, v in best.items() if k != "model"}, best["model"]
        planned = resume.get("train_config")
        if cfg.time_budget_s and planned is not None and planned.max_steps:
            # a budgeted run continues the plan it made, not a new one from a cold start
            cfg = dataclasses.replace(cfg, max_steps=planned.max_steps, epochs=planned.epochs,
                                      eval_every=planned.eval_every)
    # The weights' EMA (cfg.ema > 0): evaluated, kept and returned instead of the raw weights, which go on training
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_average(cfg.ema), use_buffers=True) \
        if cfg.ema else None
    if ema is not None and resume is not None and (resume.get("extra") or {}).get("ema"):
        saved = resume["extra"]["ema"]
        ema.module.load_state_dict(saved["model"])
        ema.n_averaged.fill_(int(saved["updates"]))
    evaluated = ema.module if ema is not None else model  # what evaluations, selection and the result see
    step_fn = step_fn or (lambda m, b: m.compute_losses(b.images, b.targets))
    trainable = [p for g in opt.param_groups for p in g["params"]]
    budgeted = bool(cfg.time_budget_s) and not cfg.max_steps  # a plan is still to be made
    steps_per_epoch = len(make_loader(train_set, cfg.batch_size, shuffle=False, seed=0))
    run_t0 = time.perf_counter() - sum(e.get("train_time_s", 0.0) + e.get("eval_time_s", 0.0) for e in state.history)
    patience_left = cfg.early_stop_patience

    def checkpoint() -> None:
        if out is not None:
            keep = dict(extra or {})
            if state.best is not None and state.best_weights is not None:
                keep["best"] = {**state.best, "model": state.best_weights}
            if ema is not None:  # a resumed run continues the same average
                keep["ema"] = {"model": {k: v.detach().cpu() for k, v in ema.module.state_dict().items()},
                               "updates": int(ema.n_averaged)}
            save_checkpoint(out, model, model_cfg, cfg, categories, state.history, opt, state.epoch, state.step, keep)
            if hooks.on_checkpoint:
                hooks.on_checkpoint(Path(out))

    def finished() -> bool:
        if state.stopped:
            return True
        return state.step >= cfg.max_steps if cfg.max_steps else state.epoch >= cfg.epochs

    def lay_out(step_s: float, eval_s: float) -> None:
        """The budgeted plan: total steps, epochs, evaluation spacing (all stored in the checkpoint).

        The evaluations still to pay for depend on the plan (a short run evaluates every epoch,
        fewer than cfg.evaluations times), so the plan is solved twice: once reserving
        cfg.evaluations, then reserving the evaluations that plan actually makes.
        """
        nonlocal cfg
        evals_done = sum("AP" in e for e in state.history)
        evals_left = max(1, cfg.evaluations - evals_done)
        for _ in range(2):
            # capped by the epochs asked for, not by the previous plan's (a re-plan may grow)
            steps = plan_steps(epoch_cap, step_s, eval_s, steps_per_epoch, time.perf_counter() - run_t0, state.step,
                               evals_left)
            epochs = math.ceil(steps / steps_per_epoch)
            every = max(1, round(epochs / cfg.evaluations))
            evals_left = max(1, min(evals_left, math.ceil((epochs - state.epoch) / every)))
        cfg = dataclasses.replace(cfg, max_steps=steps, epochs=epochs, eval_every=every)
        announce()

    def announce() -> None:
        if hooks.on_plan:
            hooks.on_plan({"epochs": cfg.epochs, "steps": cfg.max_steps, "steps_per_epoch": steps_per_epoch,
                           "time_budget_s": cfg.time_budget_s})

    epoch_cap = cfg  # the config before any plan: its `epochs` is the user's cap

    def before_decay() -> bool:
        """Whether a re-plan can still move the lr decay: the plan exists and its first decay is ahead."""
        return bool(cfg.max_steps) and state.step < cfg.max_steps * min(cfg.lr_steps, default=1.0)

    eval_s = 0.0  # an evaluation's cost in the plan: estimated from the first steps, then measured
    step_times: list[float] = []  # wall time of each step, its batch's loading included
    last_end: float | None = None
    announce()
    while not finished():
        epoch = state.epoch
        # Per-epoch seeding makes shuffling and augmentation identical whether a run
        # goes straight through or is resumed from a checkpoint.
        seed_everything(cfg.seed * 1000 + epoch)
        loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch,
                             num_workers=workers, pin_memory=device.type == "cuda")
        model.train()
        # The steps run with channels_last weights and images: oneDNN's convolutions take ~23 % less
        # forward time in that layout on CPU (bench/profile_step.py --channels-last; the whole step
        # ~5 % less). The parameters stay the same objects, so the optimizer is unaffected; evaluation
        # and the returned model are back in the default layout, where saved weights reload exactly.
        model.to(memory_format=torch.channels_last)
        sums: dict[str, float] = {}
        n_images, n_steps, t0 = 0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not hooks.progress, leave=False)
        last_end = None  # the first batch of an epoch also pays for the loader's start
        for i, batch in enumerate(bar):
            if hooks.should_stop and hooks.should_stop():
                raise TrainingCancelled(f"cancelled in epoch {epoch + 1}, step {i}")
            ts = time.perf_counter()
            total = cfg.max_steps or cfg.epochs * len(loader)
            lr = lr_at(state.step, epoch, cfg, total)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
            batch = batch.to(device, non_blocking=True)
            batch.images = batch.images.contiguous(memory_format=torch.channels_last)
            with devices.autocast(device, precision):
                losses = step_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            if cfg.grad_clip:
                scaler.unscale_(opt)  # clip the true gradients, not the scaled ones (a no-op without fp16)
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            state.step += 1
            n_steps += 1
            n_images += batch.images.shape[0]
            # one device-to-host copy for all the step's losses (a GPU syncs once, not once per loss)
            values = torch.stack([v.detach().float() for v in losses.values()]).tolist()
            scalars = dict(zip(losses.keys(), values))
            for k, v in scalars.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{scalars['loss']:.3f}", lr=f"{lr:.1e}")
            if hooks.on_step:
                hooks.on_step(epoch, i, len(loader), scalars)
            end = time.perf_counter()
            step_times.append(end - (last_end if last_end is not None else ts))
            last_end = end
            if budgeted and len(step_times) == PROBE_STEPS:
                step_s = float(np.median(step_times[1:]))
                # evaluation ~ a forward per val image, about a third of a training step per image,
                # until the first one is timed
                eval_s = 0.4 * step_s / cfg.batch_size * eval_images if evaluate is not None else 0.0
                lay_out(step_s, eval_s)
                bar.total = min(len(loader), cfg.max_steps)
            elif budgeted and len(step_times) % PROBE_STEPS == 0 and before_decay():
                # re-plan every few steps from the latest ones while the lr is still flat: the first
                # steps can be slow for reasons that pass (images decoded for the first time, another
                # job on the same cores), and a plan made from them alone once ended a 10-minute run
                # after 4 minutes, before any evaluation could correct it
                lay_out(float(np.median(step_times[-PROBE_STEPS:])), eval_s)
            if cfg.max_steps and state.step >= cfg.max_steps:
                break
            if cfg.time_budget_s and time.perf_counter() - run_t0 >= cfg.time_budget_s:
                break  # the plan was too optimistic: the budget is a promise to the user
        model.to(memory_format=torch.contiguous_format)
        elapsed = time.perf_counter() - t0
        steps = max(1, n_steps)
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": sums.get("loss", 0.0) / steps,
            "losses": {k: v / steps for k, v in sums.items() if k != "loss"},
            "lr": lr_at(state.step, epoch, cfg, cfg.max_steps or cfg.epochs * len(loader)),
            "train_time_s": elapsed,
            "images_per_s": n_images / elapsed if elapsed > 0 else 0.0,
            "step": state.step,
        }
        state.epoch += 1
        over_budget = bool(cfg.time_budget_s) and time.perf_counter() - run_t0 >= cfg.time_budget_s
        last_epoch = finished() or over_budget
        if evaluate is not None and (state.epoch % cfg.eval_every == 0 or last_epoch):
            te = time.perf_counter()
            metrics = evaluate(evaluated)
            entry["eval_time_s"] = time.perf_counter() - te
            entry.update({k: metrics["segm"][k] for k in ("AP", "AP50", "AP75")})
            entry["agnostic_AP"] = metrics["class_agnostic"]["AP"]
            entry["agnostic_AP50"] = metrics["class_agnostic"]["AP50"]
            if hooks.on_evaluation:
                hooks.on_evaluation(evaluated, {**metrics, "epoch": state.epoch, "step": state.step,
                                            "elapsed_s": time.perf_counter() - run_t0})
            score = selection_score(metrics)
            if state.best is None or score > state.best["score"]:
                state.best = {"epoch": state.epoch, "step": state.step, "score": score, "metrics": metrics}
                if cfg.keep_best:
                    # on the CPU: a GPU's memory is for training, and the checkpoint is written from CPU copies
                    state.best_weights = {k: v.detach().to("cpu", copy=True)
                                          for k, v in evaluated.state_dict().items()}
                patience_left = cfg.early_stop_patience
            elif cfg.early_stop_patience:
                patience_left -= 1
                if patience_left <= 0:
                    state.stopped = "early_stop"
            if budgeted:
                eval_s = float(entry["eval_time_s"])  # evaluations cost what they cost
                if before_decay():
                    recent = step_times[-PROBE_STEPS:] if len(step_times) > 1 else [elapsed / steps]
                    lay_out(float(np.median(recent)), eval_s)
        if over_budget and not finished():
            state.stopped = "time_budget"
        state.history.append(entry)
        if hooks.on_epoch:
            hooks.on_epoch(entry)
        if state.epoch % cfg.checkpoint_every == 0 or finished():
            if finished() and cfg.keep_best and state.best_weights is not None and state.best is not None \
                    and (state.best["step"] != state.step or ema is not None):
                # the run ends on the best evaluation's weights, not on whatever the last step left
                model.load_state_dict(state.best_weights)
            elif finished() and ema is not None:
                model.load_state_dict(ema.module.state_dict())  # no selection: the average is the result
            checkpoint()
    state.config = cfg
    return state
