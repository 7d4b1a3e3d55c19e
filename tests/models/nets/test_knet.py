import pytest
import torch

from models.config import ModelConfig
from models.errors import ConfigError
from models.nets.knet import KNet, build_knet, mask_pool


@pytest.mark.parametrize("n,s,width", [(10, 1, 32), (20, 3, 64)])
def test_output_shapes_follow_config(n, s, width):
    cfg = ModelConfig(num_classes=7, backbone_weights="none", width=width, num_kernels=n, num_stages=s,
                      num_heads=4, ffn_dim=2 * width, gn_groups=8)
    net = KNet(cfg).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 128, 192))
    assert out["init_masks"].shape == (2, n, 16, 24)  # stride 8
    assert out["sem_seg"].shape == (2, 7, 16, 24)
    assert len(out["stages"]) == s
    for st in out["stages"]:
        assert st["masks"].shape == (2, n, 16, 24) and st["logits"].shape == (2, n, 7)


def test_prompts_change_stages_but_not_initial_masks():
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=3, backbone_weights="none", width=32, num_kernels=8, num_stages=2, gn_groups=8)
    net = KNet(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = net(x)
        b = net(x, kernel_prompts=torch.randn(1, 8, 32))
    assert torch.equal(a["init_masks"], b["init_masks"])
    assert not torch.allclose(a["stages"][0]["logits"], b["stages"][0]["logits"])


def test_mask_pool_sums_features_under_hard_masks():
    feats = torch.arange(2 * 2 * 2, dtype=torch.float32).reshape(1, 2, 2, 2)  # C=2, 2x2
    masks = torch.tensor([[[[10.0, -10.0], [-10.0, 10.0]]]])  # kernel covers (0,0), (1,1)
    pooled = mask_pool(masks, feats)
    assert torch.equal(pooled, torch.tensor([[[0.0 + 3.0, 4.0 + 7.0]]]))


def test_imagenet_backbone_loads_torchvision_weights():
    import torchvision

    net = KNet(ModelConfig(num_classes=2, backbone_weights="imagenet"))
    ref = torchvision.models.mobilenet_v2(weights=torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1)
    assert torch.equal(net.backbone.stages[0][0][0].weight, ref.features[0][0].weight)
    assert torch.equal(net.backbone.stages[4][-1].conv[-1].weight, ref.features[17].conv[-1].weight)


def test_frozen_stage_and_bn_eval():
    net = KNet(ModelConfig(num_classes=2, backbone_weights="none", frozen_backbone_stages=2)).train()
    assert not any(p.requires_grad for p in net.backbone.stages[1].parameters())
    assert all(p.requires_grad for p in net.backbone.stages[2].parameters())
    assert all(not m.training for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_invalid_config_is_a_config_error():
    with pytest.raises(ConfigError, match="num_heads"):
        build_knet(ModelConfig(width=100, num_heads=8))


def test_select_peaks_takes_local_maxima_before_their_neighbours():
    from models.nets.knet import select_peaks

    heat = torch.linspace(0.0, 0.01, 36).reshape(1, 6, 6)  # background rising to one corner
    heat[0, 1, 1], heat[0, 1, 2] = 0.9, 0.8  # one object: a peak and its shoulder
    heat[0, 4, 3] = 0.3  # a weaker second object
    idx = select_peaks(heat, 4)[0].tolist()
    # both objects' peaks, then the background's own local maximum, all before the shoulder
    assert idx == [1 * 6 + 1, 4 * 6 + 3, 35, 1 * 6 + 2]
    # more kernels than cells: every cell, then repeats
    many = select_peaks(torch.rand(2, 2, 2), 10)
    assert many.shape == (2, 10) and set(many[0].tolist()) == {0, 1, 2, 3}


def test_center_kernels_start_on_the_selected_features():
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=2, backbone_weights="none", width=32, num_kernels=6, num_stages=1, gn_groups=8,
                      kernel_init="centers")
    net = KNet(cfg).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 96))
    assert out["centers"].shape == (2, 1, 8, 12)  # one class-agnostic centre map
    assert out["init_masks"].shape == (2, 6, 8, 12)
    # two images give different initial kernels (static kernels would give the same weights)
    assert not torch.allclose(out["init_masks"][0], out["init_masks"][1])
    with pytest.raises(ConfigError, match="kernel_init"):
        ModelConfig(kernel_init="learned").validate()


def test_locality_prior_is_a_bump_at_each_kernels_centre():
    from models.nets.knet import LocalityPrior

    prior = LocalityPrior(8, init_cells=4.0)
    centres = torch.tensor([[[2.0, 3.0], [7.0, 0.0]]])  # two kernels, (y, x) cells
    bump = prior(torch.randn(1, 2, 8), centres, (10, 12))
    assert bump.shape == (1, 2, 10, 12)
    assert bump[0, 0, 2, 3] == 0 and bump[0, 1, 7, 0] == 0  # no penalty at the centre
    assert torch.isclose(bump[0, 0, 2, 7], torch.tensor(-0.5))  # 4 cells (one sigma) away
    assert bump[0, 0].argmax() == 2 * 12 + 3 and bump[0, 0, 9, 11] < bump[0, 0, 4, 5] < 0


def test_center_kernels_take_their_objectness_from_the_centre_map():
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=2, backbone_weights="none", width=32, num_kernels=4, num_stages=1, gn_groups=8,
                      kernel_init="centers")
    net = KNet(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    logits = []
    with torch.no_grad():
        for bias in (-3.0, 3.0):  # the same peaks (a constant shift keeps their order), more confident
            net.center_head[-1].bias.fill_(bias)
            logits.append(net(x)["stages"][0]["logits"])
    assert torch.allclose(logits[1] - logits[0], torch.full_like(logits[0], 6.0), atol=1e-4)  # every class


def test_locality_prior_on_a_finer_grid_is_centred_on_the_coarse_cell():
    from models.nets.knet import LocalityPrior

    prior = LocalityPrior(8, init_cells=4.0)
    kernels, centres = torch.randn(1, 1, 8), torch.tensor([[[2.0, 3.0]]])
    coarse, fine = prior(kernels, centres, (10, 12)), prior(kernels, centres, (20, 24), cell=2)
    # stride-8 cell 2 is stride-4 cells 4 and 5: the bump is symmetric about 4.5, and as wide
    assert torch.isclose(fine[0, 0, 4, 6], fine[0, 0, 5, 7]) and fine[0, 0].max() == fine[0, 0, 4, 6]
    assert torch.isclose(coarse[0, 0, 2 + 4, 3], torch.tensor(-0.5))  # one sigma: 4 coarse cells ...
    assert torch.isclose(fine[0, 0, 4 + 8, 6], torch.tensor(-0.5 * ((7.5 / 8) ** 2 + (0.5 / 8) ** 2)))  # ... = 8 fine


@pytest.mark.parametrize("kernel_init", ["static", "centers"])
def test_stride4_masks_start_as_the_stride8_ones_upsampled_and_learn_detail(kernel_init):
    import torch.nn.functional as F

    torch.manual_seed(0)
    kw = dict(num_classes=2, backbone_weights="none", width=32, num_kernels=6, num_stages=2, gn_groups=8,
              kernel_init=kernel_init)
    fine, coarse = build_knet(ModelConfig(mask_stride=4, **kw)), build_knet(ModelConfig(mask_stride=8, **kw))
    coarse.load_state_dict({k: v for k, v in fine.state_dict().items() if not k.startswith("net.mask_p2")})
    x = torch.randn(2, 3, 64, 96)
    fine.eval(), coarse.eval()
    with torch.no_grad():
        a, b = fine.net(x), coarse.net(x)
    assert a["stages"][0]["masks"].shape == (2, 6, 8, 12) and a["stages"][-1]["masks"].shape == (2, 6, 16, 24)
    assert torch.equal(a["stages"][-1]["logits"], b["stages"][-1]["logits"])
    up = F.interpolate(b["stages"][-1]["masks"], scale_factor=2, mode="bilinear", align_corners=False)
    if kernel_init == "static":  # no prior: the dot product commutes with the (linear) upsampling
        assert torch.allclose(a["stages"][-1]["masks"], up, atol=1e-4)
    else:  # the prior is evaluated on the finer grid itself, not upsampled
        assert (a["stages"][-1]["masks"] - up).abs().mean() < 0.1 * up.abs().mean()
    # the zero-initialised detail branch gets a gradient (no ReLU to stall it at 0)
    fine.train()
    targets = [{"masks": (torch.rand(2, 64, 96) > 0.5).to(torch.uint8), "labels": torch.tensor([0, 1])}] * 2
    fine.compute_losses(x, targets)["loss"].backward()
    assert fine.net.mask_p2[1].weight.grad.abs().sum() > 0
    dets = fine.detect(x, [(64, 96), (50, 70)])
    assert dets[0]["masks"].shape[-2:] == (16, 24) and dets[1]["masks"].shape[-2:] == (13, 18)  # stride 4, cropped


def test_a_separable_neck_has_the_same_outputs_for_a_fraction_of_the_work():
    from torch.utils.flop_counter import FlopCounterMode

    kw = dict(num_classes=3, backbone_weights="none", width=64, num_kernels=10, num_stages=2, gn_groups=8,
              kernel_init="centers")
    flops, shapes = {}, {}
    for neck in ("full", "separable"):
        net = KNet(ModelConfig(neck_conv=neck, **kw)).eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            out = net(torch.randn(1, 3, 128, 160))
        flops[neck] = counter.get_total_flops()
        shapes[neck] = [tuple(s["masks"].shape) for s in out["stages"]] + [tuple(out["centers"].shape)]
        convs = [m for m in net.sem_fpn.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert all((m.groups == m.in_channels) == (neck == "separable") for m in convs)  # depthwise 3x3 only
    assert shapes["full"] == shapes["separable"]
    assert flops["separable"] < 0.6 * flops["full"]
    with pytest.raises(ConfigError, match="neck_conv"):
        ModelConfig(neck_conv="dw").validate()


def test_class_probe_reads_the_features_under_each_mask():
    from models.nets.knet import ClassProbe

    probe = ClassProbe(4, 2)
    feats = torch.zeros(1, 4, 4, 4)
    feats[0, 0, :, :2], feats[0, 1, :, 2:] = 1.0, 1.0  # left half "class 0" features, right half "class 1"
    masks = torch.full((1, 2, 16, 16), -20.0)  # stride 8 vs the features' stride 32: 4x finer
    masks[0, 0, :, :8], masks[0, 1, :, 8:] = 20.0, 20.0  # kernel 0 on the left, kernel 1 on the right
    assert torch.equal(probe(feats, masks), torch.zeros(1, 2, 2))  # starts with no say
    with torch.no_grad():
        probe.fc.weight.copy_(torch.eye(2, 4))
    out = probe(feats, masks)
    assert out[0, 0, 0] > out[0, 0, 1] and out[0, 1, 1] > out[0, 1, 0]


def test_class_from_backbone_adds_imagenet_class_evidence_that_trains_the_backbone_head():
    torch.manual_seed(0)
    kw = dict(num_classes=3, backbone_weights="none", width=32, num_kernels=6, num_stages=2, gn_groups=8,
              kernel_init="centers", frozen_backbone_stages=3)
    model, plain = build_knet(ModelConfig(class_from_backbone=True, **kw)), build_knet(ModelConfig(**kw))
    missing = plain.load_state_dict(model.state_dict(), strict=False).unexpected_keys
    assert missing and all(k.startswith(("net.class_probe.", "net.backbone.head.")) for k in missing)
    x = torch.randn(2, 3, 64, 96)
    model.eval(), plain.eval()
    with torch.no_grad():  # the probe's read-out starts at zero: the same answer as without it
        assert torch.allclose(model.net(x)["stages"][-1]["logits"], plain.net(x)["stages"][-1]["logits"])
    model.train()
    targets = [{"masks": (torch.rand(2, 64, 96) > 0.5).to(torch.uint8), "labels": torch.tensor([0, 2])}] * 2
    model.compute_losses(x, targets)["loss"].backward()
    assert model.net.class_probe.fc.weight.grad.abs().sum() > 0
    assert model.net.backbone.head[0].weight.requires_grad  # trained with the unfrozen stages
