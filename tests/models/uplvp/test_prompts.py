import pytest
import torch

from models.config import ModelConfig
from models.errors import ConfigError
from models.nets.knet import build_knet
from models.uplvp.prompts import (
    PromptConfig,
    Prompter,
    cosine_assignment,
    fill_slots,
    fixed_assignment,
    pool_prompts,
    slot_prompts,
)


@pytest.mark.parametrize("n, expected", [
    (3, [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]),  # each 10 // 3 = 3 times, then the first 10 % 3 = 1
    (4, [0, 0, 1, 1, 2, 2, 3, 3, 0, 1]),
    (1, [0] * 10),
    (10, list(range(10))),
    (25, list(range(10))),  # more masks than slots: the first P
    (0, []),
])
def test_fill_rule(n, expected):
    assert fill_slots(n, 10) == expected


def test_slot_prompts_zero_when_no_mask():
    assert torch.equal(slot_prompts(torch.zeros(0, 8), 5), torch.zeros(5, 8))
    p = torch.arange(3.0)[:, None].expand(3, 4)
    assert slot_prompts(p, 4)[:, 0].tolist() == [0, 1, 2, 0]


def test_fixed_map_gives_each_slot_n_over_p_consecutive_kernels():
    assert fixed_assignment(50, 10).tolist() == [k // 5 for k in range(50)]
    assert fixed_assignment(7, 3).tolist() == [0, 0, 1, 1, 2, 2, 2]  # remainder goes to the last slot


def test_cosine_matching_takes_the_argmax_prompt_per_kernel():
    g = torch.Generator().manual_seed(0)
    slots = torch.randn(2, 4, 16, generator=g)
    # kernel j is a noisy, rescaled copy of slot perm[j]: its best match must be that slot
    perm = torch.tensor([[3, 0, 0, 2, 1, 3], [1, 1, 2, 0, 3, 2]])
    kernels = torch.stack([slots[b, perm[b]] * 5 for b in range(2)]) + 0.01 * torch.randn(2, 6, 16, generator=g)
    assign = cosine_assignment(kernels, slots)
    assert torch.equal(assign, perm)
    sim = torch.nn.functional.cosine_similarity(kernels[:, :, None], slots[:, None], dim=-1)
    assert torch.equal(assign, sim.argmax(-1))


def test_box_and_mask_pooling():
    feat = torch.arange(16.0).view(1, 4, 4).expand(2, 4, 4).clone()  # C=2, 4x4 grid at stride 8
    masks = torch.zeros(2, 32, 32)
    masks[0, 0:16, 0:16] = 1  # top-left 2x2 cells
    masks[1, 30:32, 30:32] = 1  # a sliver inside the last cell
    boxes = torch.tensor([[0, 0, 16, 16], [30, 30, 32, 32]], dtype=torch.float)
    box = pool_prompts(feat, 8, masks, boxes, "box")
    assert box.shape == (2, 2)
    assert box[0, 0] == torch.tensor([0, 1, 4, 5.0]).mean()
    assert box[1, 0] == 15  # a box thinner than a cell still covers its cell
    mask = pool_prompts(feat, 8, masks, boxes, "mask")
    assert torch.allclose(mask[0], box[0]) and mask[1, 0] == 15
    assert not pool_prompts(feat.requires_grad_(), 8, masks, boxes, "box").requires_grad  # detached


def test_prompt_config_is_validated():
    with pytest.raises(ConfigError, match="matching"):
        PromptConfig(matching="hungarian").validate(50)
    with pytest.raises(ConfigError, match="num_slots"):
        PromptConfig(num_slots=60).validate(50)


def _targets(n_masks: list[int], size: int = 64) -> list[dict]:
    out = []
    for i, n in enumerate(n_masks):
        m = torch.zeros(n, size, size, dtype=torch.uint8)
        for j in range(n):
            m[j, 4 * j: 4 * j + 20, 8 + i: 40] = 1
        boxes = torch.tensor([[8 + i, 4 * j, 40, 4 * j + 20] for j in range(n)], dtype=torch.float).view(n, 4)
        out.append({"masks": m, "boxes": boxes, "labels": torch.zeros(n, dtype=torch.long)})
    return out


@pytest.fixture(scope="module")
def knet():
    torch.manual_seed(0)
    return build_knet(ModelConfig(num_classes=3, backbone_weights="none", width=32, num_kernels=20, num_stages=2,
                                  gn_groups=8, num_heads=2, ffn_dim=64)).eval()


@pytest.mark.parametrize("matching", ["cosine", "fixed"])
def test_prompter_shapes_and_assignment(knet, matching):
    x = torch.randn(2, 3, 64, 64)
    cfg = PromptConfig(matching=matching, num_slots=5, dropout=0.0, level="p4")
    prompter = Prompter(cfg, _targets([3, 0]))
    with torch.no_grad():
        out = knet.net(x, prompter)
    assert prompter.last_assignment.shape == (2, 20)
    if matching == "fixed":
        assert prompter.last_assignment[0].tolist() == [k // 4 for k in range(20)]
    assert out["stages"][-1]["masks"].shape[:2] == (2, 20)


def test_prompts_change_training_outputs_but_never_inference(knet):
    x = torch.randn(2, 3, 64, 64)
    prompter = Prompter(PromptConfig(num_slots=5, dropout=0.0, level="p4"), _targets([3, 2]))
    with torch.no_grad():
        plain = knet.net(x)
        prompted = knet.net(x, prompter)
        again = knet.net(x, None)
        dets = knet.detect(x, [(64, 64), (64, 64)])
        dets_again = knet.detect(x, [(64, 64), (64, 64)])
    # the initial masks are made before the prompts are added
    assert torch.equal(plain["init_masks"], prompted["init_masks"])
    assert not torch.allclose(plain["stages"][-1]["masks"], prompted["stages"][-1]["masks"])
    assert torch.equal(plain["stages"][-1]["masks"], again["stages"][-1]["masks"])
    # detection (inference) has no way to receive prompts and is deterministic
    for a, b in zip(dets, dets_again):
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_prompt_dropout_zeroes_about_ten_percent(knet):
    torch.manual_seed(1)
    prompter = Prompter(PromptConfig(num_slots=5, dropout=0.1, level="p4"), _targets([3] * 8))
    pyramid = [torch.randn(8, 32, 64 // s, 64 // s) + 3 for s in (4, 8, 16, 32)]
    prompts = prompter(pyramid, torch.randn(8, 20, 32))
    dropped = (prompts.abs().sum(-1) == 0).float().mean().item()
    assert 0.02 < dropped < 0.25
    prompter.training = False
    assert (prompter(pyramid, torch.randn(8, 20, 32)).abs().sum(-1) > 0).all()
