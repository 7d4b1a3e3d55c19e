"""Schedules: a run laid out for a time budget, the best checkpoint kept, early stopping, resume of a plan."""

import time

import pytest
import torch

from models.config import ModelConfig, TrainConfig
from models.data.coco import CocoAnnotations
from models.data.dataset import CocoDataset
from models.data.transforms import TransformConfig
from models.engine.checkpoint import load_checkpoint
from models.engine.train import (
    PROBE_STEPS,
    TrainHooks,
    TrainingCancelled,
    lr_at,
    plan_steps,
    train,
)
from models.nets.build import build_model

TINY = dict(backbone_weights="none", width=32, num_kernels=8, num_stages=1, num_heads=4, ffn_dim=64, gn_groups=8)


@pytest.fixture(scope="module")
def voc(voc_coco):
    return CocoAnnotations(*voc_coco)


def _setup(voc, **train_kw):
    mcfg = ModelConfig(num_classes=len(voc.categories), **TINY)
    tcfg = TrainConfig(batch_size=1, short_side=96, max_long_side=128, warmup_iters=2, **train_kw)
    ds = CocoDataset(voc, TransformConfig(96, 128), train=True)
    torch.manual_seed(0)
    return build_model(mcfg), ds, mcfg, tcfg


def test_plan_steps_fills_the_budget_after_evaluations():
    cfg = TrainConfig(epochs=10_000, time_budget_s=100.0)
    # 100 s, 10 s already spent, 8 evaluations of 2.5 s left: 70 s of steps at 0.5 s = 140 steps more
    assert plan_steps(cfg, 0.5, 2.5, 20, 10.0, 6, 8) == 146
    assert plan_steps(TrainConfig(epochs=2, time_budget_s=100.0), 0.5, 0.0, 20, 0.0, 0, 1) == 40  # epochs cap
    assert plan_steps(cfg, 0.5, 100.0, 20, 0.0, 6, 8) == 7  # nothing fits: one more step, never fewer than done


def test_step_schedule_decays_at_fractions_of_the_planned_steps():
    cfg = TrainConfig(lr=1e-3, max_steps=200, lr_steps=(0.8, 0.95), warmup_iters=10)
    assert lr_at(5, 0, cfg) < 1e-3  # warm-up
    assert lr_at(159, 7, cfg) == pytest.approx(1e-3)
    assert lr_at(160, 7, cfg) == pytest.approx(1e-4)
    assert lr_at(190, 9, cfg) == pytest.approx(1e-5)


def test_budgeted_run_ends_within_its_budget_and_keeps_its_plan(voc, tmp_path):
    model, ds, mcfg, tcfg = _setup(voc, epochs=10_000, time_budget_s=6.0)
    plans = []
    evaluate = lambda m: {"segm": {"AP": 0.1, "AP50": 0.2, "AP75": 0.0}, "class_agnostic": {"AP": 0.1, "AP50": 0.2}}
    t0 = time.perf_counter()
    state = train(model, ds, mcfg, tcfg, voc.categories.to_coco(), out=tmp_path / "b.pt", evaluate=evaluate,
                  hooks=TrainHooks(progress=False, on_plan=plans.append), eval_images=1)
    took = time.perf_counter() - t0
    assert took < 6.0 * 1.25 + 3  # the budget holds (a step and an evaluation of slack)
    assert state.config.max_steps > PROBE_STEPS and state.step <= state.config.max_steps
    assert plans[0]["steps"] == 0 and plans[-1]["steps"] == state.config.max_steps  # announced once timed
    assert any("AP" in e for e in state.history)
    ckpt = load_checkpoint(tmp_path / "b.pt")
    assert ckpt["train_config"].max_steps == state.config.max_steps  # the plan travels with the checkpoint


def test_a_plan_made_from_slow_first_steps_grows_once_the_steps_get_faster(voc):
    # the first 8 steps take 0.4 s more (think: another job on the same cores), the rest run at the model's
    # speed; a plan made from the first steps alone would end the run long before its budget
    model, ds, mcfg, tcfg = _setup(voc, epochs=10_000, time_budget_s=12.0)
    calls = []

    def step_fn(m, b):
        calls.append(1)
        if len(calls) <= 8:
            time.sleep(0.4)
        return m.compute_losses(b.images, b.targets)

    plans = []
    t0 = time.perf_counter()
    state = train(model, ds, mcfg, tcfg, voc.categories.to_coco(), hooks=TrainHooks(progress=False, on_plan=plans.append),
                  step_fn=step_fn)
    took = time.perf_counter() - t0
    first = plans[1]["steps"]  # plans[0] is the announcement before any step was timed
    assert first < 12.0 / 0.4  # made from the slow steps
    assert state.config.max_steps > 2 * first and state.step > 2 * first
    assert 12.0 * 0.6 < took < 12.0 * 1.25 + 3  # it used its budget, and kept to it


def test_resumed_budgeted_run_continues_its_plan(voc, tmp_path):
    # a budget far longer than the test: both runs are cancelled, so the plan (made after the first
    # timed steps) cannot be used up, however slow or loaded the machine is
    model, ds, mcfg, tcfg = _setup(voc, epochs=10_000, time_budget_s=600.0)
    done = []
    hooks = TrainHooks(progress=False, on_epoch=lambda e: done.append(e["epoch"]), should_stop=lambda: len(done) >= 8)
    with pytest.raises(TrainingCancelled):
        train(model, ds, mcfg, tcfg, voc.categories.to_coco(), out=tmp_path / "r.pt", hooks=hooks)
    ckpt = load_checkpoint(tmp_path / "r.pt")
    planned = ckpt["train_config"].max_steps
    assert planned > ckpt["step"] == 8
    model2, *_ = _setup(voc)
    plans, more = [], []
    hooks = TrainHooks(progress=False, on_plan=plans.append, on_epoch=more.append, should_stop=lambda: len(more) >= 2)
    with pytest.raises(TrainingCancelled):
        train(model2, ds, mcfg, tcfg, voc.categories.to_coco(), out=tmp_path / "r.pt", resume=ckpt, hooks=hooks)
    assert [p["steps"] for p in plans] == [planned]  # the stored plan, announced once; no new plan from a cold start
    resumed = load_checkpoint(tmp_path / "r.pt")
    assert resumed["step"] == 10 and resumed["train_config"].max_steps == planned


def test_best_evaluation_is_kept_and_patience_stops_the_run(voc, tmp_path):
    model, ds, mcfg, tcfg = _setup(voc, epochs=10, early_stop_patience=2)
    scores = iter([0.2, 0.6, 0.3, 0.1, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0])
    snapshots = {}

    def evaluate(m):
        ap = next(scores)
        return {"segm": {"AP": ap, "AP50": ap, "AP75": ap}, "class_agnostic": {"AP": ap, "AP50": ap}}

    def on_evaluation(m, metrics):
        snapshots[metrics["epoch"]] = {k: v.clone() for k, v in m.state_dict().items()}

    state = train(model, ds, mcfg, tcfg, voc.categories.to_coco(), out=tmp_path / "k.pt", evaluate=evaluate,
                  hooks=TrainHooks(progress=False, on_evaluation=on_evaluation))
    assert state.stopped == "early_stop" and state.epoch == 4  # two evaluations without beating epoch 2
    assert state.best["epoch"] == 2 and state.best["score"] == 0.6
    for k, v in model.state_dict().items():  # the model ends on epoch 2's weights, and so does the checkpoint
        assert torch.equal(v, snapshots[2][k]), k
    saved = load_checkpoint(tmp_path / "k.pt")["model"]
    assert all(torch.equal(saved[k], snapshots[2][k]) for k in saved)
