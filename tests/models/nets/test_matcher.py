import torch

from models.nets.matcher import HungarianMatcher, dice_cost, focal_cost, mask_cost


def _targets(g: int, h: int = 16, w: int = 16, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    masks = (torch.rand(g, h, w, generator=gen) > 0.6).float()
    return {"masks": masks, "labels": torch.randint(0, 5, (g,), generator=gen)}


def test_perfect_predictions_are_assigned_to_their_kernels():
    tgt = _targets(3)
    n = 8
    logits = torch.full((1, n, 16, 16), -8.0)
    owners = [5, 1, 6]  # GT g is drawn by kernel owners[g]
    for g, k in enumerate(owners):
        logits[0, k] = tgt["masks"][g] * 16 - 8
    cls = torch.full((1, n, 5), -5.0)
    for g, k in enumerate(owners):
        cls[0, k, tgt["labels"][g]] = 5.0
    (kernels, gts), = HungarianMatcher()(logits, cls, [tgt])
    assert dict(zip(gts.tolist(), kernels.tolist())) == dict(enumerate(owners))


def test_batched_equals_per_image():
    torch.manual_seed(0)
    targets = [_targets(3, seed=1), _targets(0, seed=2), _targets(5, seed=3)]
    masks = torch.randn(3, 10, 16, 16)
    cls = torch.randn(3, 10, 5)
    matcher = HungarianMatcher()
    batched = matcher(masks, cls, targets)
    for b, tgt in enumerate(targets):
        (k, g), = matcher(masks[b : b + 1], cls[b : b + 1], [tgt])
        assert torch.equal(k, batched[b][0]) and torch.equal(g, batched[b][1])


def test_empty_targets_give_empty_assignment():
    (k, g), = HungarianMatcher()(torch.randn(1, 4, 8, 8), None, [_targets(0, 8, 8)])
    assert k.numel() == 0 and g.numel() == 0 and k.dtype == torch.int64


def test_more_targets_than_kernels_assigns_each_kernel_once():
    (k, g), = HungarianMatcher()(torch.randn(1, 3, 16, 16), torch.randn(1, 3, 5), [_targets(6)])
    assert len(k) == 3 and len(set(k.tolist())) == 3 and len(set(g.tolist())) == 3


def test_cost_terms_on_hand_made_values():
    pred = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    tgt = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    d = dice_cost(pred, tgt)
    assert torch.allclose(d, torch.tensor([[-4 / (2 + 2 + 2e-3), 0.0]]))
    m = mask_cost(pred, tgt)
    assert torch.allclose(m, torch.tensor([[-1.0, 0.0]]))
    # focal cost is lower (better) for the class the logits favour
    f = focal_cost(torch.tensor([[4.0, -4.0]]), torch.tensor([0, 1]))
    assert f[0, 0] < 0 < f[0, 1]
