import math

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from models.nets.criterion import (
    DEFAULT_WEIGHTS,
    SetCriterion,
    build_criterion,
    dice_loss,
)
from models.nets.matcher import HungarianMatcher


def test_dice_loss_hand_made():
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1  # 8 of 16 pixels
    # p = 0.5 everywhere: 1 - 2*0.5*8 / (0.25*16 + 8 + 2e-3)
    assert math.isclose(dice_loss(torch.zeros(1, 4, 4), target).item(), 1 - 8 / (4 + 8 + 2e-3), rel_tol=1e-5)
    perfect = target * 40 - 20
    assert dice_loss(perfect, target).item() < 1e-3
    assert dice_loss(-perfect, target).item() > 0.999


def _outputs(b=2, n=6, k=3, h=8, w=8, stages=2, requires_grad=True):
    def t(*shape):
        return torch.randn(*shape, requires_grad=requires_grad)

    return {
        "init_masks": t(b, n, h, w),
        "sem_seg": t(b, k, h, w),
        "stages": [{"masks": t(b, n, h, w), "logits": t(b, n, k)} for _ in range(stages)],
    }


def _targets(b=2, g=2, size=64):
    out = []
    for i in range(b):
        masks = torch.zeros(g, size, size, dtype=torch.uint8)
        for j in range(g):
            masks[j, 8 * j : 8 * j + 24, 4 + i * 8 : 36 + i * 8] = 1
        out.append({"masks": masks, "labels": torch.tensor([j % 3 for j in range(g)])})
    return out


def test_loss_names_finite_and_differentiable():
    torch.manual_seed(0)
    crit = build_criterion(3)
    outs = _outputs()
    losses = crit(outs, _targets())
    assert set(losses) == {"init_bce", "init_dice", "sem_seg"} | {f"s{i}_{n}" for i in range(2) for n in ("cls", "bce", "dice")}
    total = crit.total(losses)
    assert torch.isfinite(total)
    total.backward()
    assert outs["stages"][1]["logits"].grad.abs().sum() > 0
    assert outs["init_masks"].grad.abs().sum() > 0


def test_mask_losses_upsample_only_the_matched_masks_and_equal_upsampling_all():
    """_gather upsamples the P matched masks; the reference upsamples all N and then picks: the same
    losses and the same gradients (bilinear upsampling acts on each mask alone)."""
    from models.nets.criterion import resize_targets, upsample2

    torch.manual_seed(0)
    crit = build_criterion(3)
    outs, tg = _outputs(n=8), _targets(g=3)
    losses = crit(outs, tg)
    soft = resize_targets(tg, (16, 16))
    ref = {}
    for name, masks in (("init", outs["init_masks"]), ("s1", outs["stages"][1]["masks"])):
        up = upsample2(masks)
        prev = upsample2(outs["init_masks"] if name == "init" else outs["stages"][0]["masks"]).detach()
        logits = None if name == "init" else outs["stages"][0]["logits"].detach()
        assign = crit.matcher(prev, logits, soft, 1)
        pred = torch.cat([up[b, k] for b, (k, _) in enumerate(assign)])
        tgt = torch.cat([soft[b]["masks"][g] for b, (_, g) in enumerate(assign)])
        ref[f"{name}_bce"] = F.binary_cross_entropy_with_logits(pred, tgt)
        ref[f"{name}_dice"] = dice_loss(pred, tgt)
    for name, value in ref.items():
        assert torch.allclose(losses[name], value, atol=1e-6), name
    got = torch.autograd.grad(losses["s1_bce"] + losses["s1_dice"], outs["stages"][1]["masks"])[0]
    want = torch.autograd.grad(ref["s1_bce"] + ref["s1_dice"], outs["stages"][1]["masks"])[0]
    assert torch.allclose(got, want, atol=1e-7) and got.abs().sum() > 0


def test_total_applies_weights_by_name():
    crit = build_criterion(3)
    one = torch.tensor(1.0)
    losses = {"init_bce": one, "init_dice": one, "sem_seg": one, "center": one, "s0_cls": one, "s0_bce": one, "s0_dice": one}
    assert crit.total(losses).item() == sum(DEFAULT_WEIGHTS.values())
    crit2 = SetCriterion(3, HungarianMatcher(), {**DEFAULT_WEIGHTS, "dice": 0.0})
    assert crit2.total(losses).item() == sum(DEFAULT_WEIGHTS.values()) - DEFAULT_WEIGHTS["dice"]


def test_empty_targets_only_background_classification():
    torch.manual_seed(0)
    crit = build_criterion(3)
    outs = _outputs()
    empty = [{"masks": torch.zeros(0, 64, 64, dtype=torch.uint8), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = crit(outs, empty)
    for name in ("init_bce", "init_dice", "s0_bce", "s1_dice"):
        assert losses[name].item() == 0.0
    # with no positives the focal loss is the plain sum over all-zero targets (normaliser 1)
    logits = outs["stages"][0]["logits"]
    expected = sigmoid_focal_loss(logits, torch.zeros_like(logits), reduction="sum")
    assert torch.allclose(losses["s0_cls"], expected)
    crit.total(losses).backward()


def test_classification_normalised_by_positives():
    torch.manual_seed(0)
    crit = build_criterion(3)
    outs = _outputs(b=1, n=4, stages=1, requires_grad=False)
    tg = _targets(b=1, g=2)
    losses = crit(outs, tg)
    # recompute by hand with the matcher's stage-0 assignment (initial masks, no class scores)
    from models.nets.criterion import resize_targets, upsample2

    soft = resize_targets(tg, (16, 16))
    (k, g), = crit.matcher(upsample2(outs["init_masks"]), None, soft)
    onehot = torch.zeros(1, 4, 3)
    onehot[0, k, soft[0]["labels"][g]] = 1
    expected = sigmoid_focal_loss(outs["stages"][0]["logits"], onehot, reduction="sum") / 2
    assert torch.allclose(losses["s0_cls"], expected)


def test_center_targets_peak_once_per_object_and_on_the_object():
    from models.nets.criterion import center_targets, resize_targets

    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 8:24] = 1  # a box: its centre is inside
    masks[1, 8:56, 40:56] = 1  # an L shape whose centre of mass lies outside it
    masks[1, 40:56, 24:56] = 1
    soft = resize_targets([{"masks": masks, "labels": torch.tensor([0, 1])}], (16, 16))
    heat = center_targets(soft, 2, (8, 8))
    assert heat.shape == (1, 2, 8, 8) and heat.max() <= 1
    for k in range(2):
        ys, xs = torch.nonzero(heat[0, k] >= 1 - 1e-4, as_tuple=True)
        assert len(ys) >= 1
        cell = F.avg_pool2d(masks[k][None, None].float(), 8)[0, 0]
        assert all(cell[y, x] > 0 for y, x in zip(ys.tolist(), xs.tolist()))  # the peak is on the object
    agnostic = center_targets(soft, 1, (8, 8))  # one map: both objects' peaks in it
    assert agnostic.shape == (1, 1, 8, 8) and torch.equal(agnostic[0, 0], heat[0].amax(0))


def test_center_loss_falls_when_the_map_predicts_the_centres():
    from models.nets.criterion import center_focal_loss

    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, 3, 3] = 1.0
    target[0, 0, 3, 4] = 0.5
    good = torch.full_like(target, -6.0)
    good[0, 0, 3, 3] = 6.0
    bad = torch.full_like(target, -6.0)
    bad[0, 0, 6, 6] = 6.0
    assert center_focal_loss(good, target) < 0.01 < center_focal_loss(bad, target)


def test_center_loss_only_with_center_outputs():
    crit = build_criterion(3)
    outs = _outputs()
    outs["centers"] = torch.randn(2, 3, 8, 8, requires_grad=True)
    losses = crit(outs, _targets())
    assert "center" in losses and torch.isfinite(losses["center"])
    crit.total(losses).backward()
    assert outs["centers"].grad.abs().sum() > 0
