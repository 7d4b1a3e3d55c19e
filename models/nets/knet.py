"""K-Net: initial kernels from a semantic-FPN, then S dynamic kernel-update stages (method.md §5).

The initial kernels are the reference's static vectors, or (kernel_init "centers", the recipe) the
features at each image's predicted object centres with a locality prior on their masks.

Shapes: B images, N kernels, C channels (config.width), K classes, (h, w) = stride-8 grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.nets.backbone import MobileNetV2Backbone
from models.nets.neck import FPN, SemanticFPN, conv_gn_relu

# {"init_masks": [B,N,h,w], "sem_seg": [B,K,h,w], "stages": [{"masks","logits"}] * S,
#  and with kernel_init "centers": "centers": [B,1,h,w] objectness-centre logits}
KNetOutputs = dict
# prompts added to the initial kernels: a tensor [B,N,C] or (pyramid, kernels [B,N,C]) -> [B,N,C]
PromptSource = torch.Tensor | Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor] | None


def mask_pool(masks: torch.Tensor, feats: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Group feature assembling: sum (or mean) of features under each hard mask.

    masks: [B,N,h,w] logits; feats: [B,C,h,w] -> [B,N,C]. The hard 0.5 threshold
    and the *sum* (not mean) follow K-Net (`use_binary=True`).
    """
    binary = (masks.sigmoid() > 0.5).to(feats.dtype)
    pooled = torch.einsum("bnhw,bchw->bnc", binary, feats)
    return pooled / binary.flatten(2).sum(-1, keepdim=True).clamp(min=1) if mean else pooled


class KernelUpdator(nn.Module):
    """Adaptive gated kernel update: fuses assembled group features F with kernels K.

    F, K: [B,N,C] -> [B,N,C].  G = (W_in K) * (P_in F); two gates from G decide how
    much of the new evidence (P_out F) versus the old kernel (I_out K) survives.
    """

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dynamic_layer = nn.Linear(c, 2 * c)
        self.input_layer = nn.Linear(c, 2 * c)
        self.input_gate = nn.Linear(c, c)
        self.update_gate = nn.Linear(c, c)
        self.norm_in = nn.LayerNorm(c)
        self.input_norm_in = nn.LayerNorm(c)
        self.norm_out = nn.LayerNorm(c)
        self.input_norm_out = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)
        self.fc_norm = nn.LayerNorm(c)

    def forward(self, group_feats: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        p_in, p_out = self.dynamic_layer(group_feats).chunk(2, dim=-1)
        i_in, i_out = self.input_layer(kernels).chunk(2, dim=-1)
        gate = i_in * p_in
        g_in = self.input_norm_in(self.input_gate(gate)).sigmoid()
        g_upd = self.norm_in(self.update_gate(gate)).sigmoid()
        upd = g_upd * self.norm_out(p_out) + g_in * self.input_norm_out(i_out)
        return F.relu(self.fc_norm(self.fc(upd)))


def select_peaks(heat: torch.Tensor, n: int) -> torch.Tensor:
    """The n best positions of a centre heat map, local maxima first.

    heat: [B,h,w] probabilities -> [B,n] flat indices into h*w. A 3x3 local maximum ranks above
    every other cell (CenterNet's max-pool "NMS"), so one object gives one kernel while it has
    peaks to spare; when there are fewer than n cells, indices repeat.
    """
    b, h, w = heat.shape
    peak = heat == F.max_pool2d(heat[:, None], 3, stride=1, padding=1)[:, 0]
    rank = (heat + peak.to(heat.dtype)).flatten(1)
    idx = rank.topk(min(n, h * w), dim=1).indices
    if idx.shape[1] < n:
        idx = idx.repeat(1, math.ceil(n / idx.shape[1]))[:, :n]
    return idx


def _at_cells(maps: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """maps [B,D,h,w], flat cell indices idx [B,N] -> the maps' values there, [B,N,D]."""
    return maps.flatten(2).gather(2, idx[:, None].expand(-1, maps.shape[1], -1)).transpose(1, 2)


class LocalityPrior(nn.Module):
    """A Gaussian bump around each kernel's centre, added to its mask logits (kernel_init "centers").

    kernels [B,N,C], centres [B,N,2] (y, x in grid cells), grid (h, w) -> [B,N,h,w] logits
    -0.5 * ((y - cy)^2 / sy^2 + (x - cx)^2 / sx^2), with (sy, sx) read from the kernel. A kernel
    dotted with the features lights up every pixel that looks like its object; the bump keeps it
    on the one it started from, so two balloons side by side get two masks (CondInst gives its
    dynamic mask heads relative coordinates for the same reason).
    """

    def __init__(self, c: int, init_cells: float = 4.0) -> None:
        super().__init__()
        self.scale = nn.Linear(c, 2)
        nn.init.zeros_(self.scale.weight)
        nn.init.constant_(self.scale.bias, math.log(init_cells))

    def forward(self, kernels: torch.Tensor, centres: torch.Tensor, grid: tuple[int, int],
                cell: int = 1) -> torch.Tensor:
        """`cell` > 1: `grid` is `cell` times finer than the one `centres` and the widths are counted in
        (the stride-4 masks of ModelConfig.mask_stride 4 around stride-8 centres)."""
        h, w = grid
        sigma = self.scale(kernels).clamp(max=8.0).exp() * cell  # [B,N,2]
        centres = centres * cell + (cell - 1) / 2  # the centre of a coarse cell, in fine cells
        ys = torch.arange(h, device=kernels.device, dtype=kernels.dtype)
        xs = torch.arange(w, device=kernels.device, dtype=kernels.dtype)
        dy = (ys[None, None] - centres[..., :1]) / sigma[..., :1]  # [B,N,h]
        dx = (xs[None, None] - centres[..., 1:]) / sigma[..., 1:]  # [B,N,w]
        return -0.5 * (dy.pow(2)[..., :, None] + dx.pow(2)[..., None, :])


class ClassProbe(nn.Module):
    """Class logits from ImageNet classifier features under each mask (ModelConfig.class_from_backbone).

    features [B,D,h',w'] (stride 32), masks [B,N,h,w] logits (stride 8 or 4) -> [B,N,K]: the
    features averaged with the mask's probabilities (detached: the read-out must not reshape
    the masks to suit the class), layer-normed, then linear. The linear layer starts at zero, so
    the kernels' own class head decides until the probe has learnt something.
    """

    def __init__(self, d: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        weight = F.adaptive_avg_pool2d(masks.detach().sigmoid(), features.shape[-2:])  # [B,N,h',w']
        pooled = torch.einsum("bnhw,bdhw->bnd", weight, features)
        pooled = pooled / weight.flatten(2).sum(-1, keepdim=True).clamp(min=1e-4)
        return self.fc(self.norm(pooled))


def _head(c: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c, c, bias=False), nn.LayerNorm(c), nn.ReLU(inplace=True), nn.Linear(c, out))


class KernelUpdateStage(nn.Module):
    """One K-Net stage: assemble, update, kernel self-attention, FFN, then class and mask heads.

    Inputs: X [B,C,h,w], kernels [B,N,C], previous masks [B,N,h,w] (logits).
    Returns (kernels [B,N,C], masks [B,N,h,w] logits, class logits [B,N,K]).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.width
        self.feat_transform = nn.Conv2d(c, c, 1)
        self.updator = KernelUpdator(c)
        self.attn = nn.MultiheadAttention(c, cfg.num_heads, batch_first=True)
        self.attn_norm = nn.LayerNorm(c)
        self.ffn = nn.Sequential(nn.Linear(c, cfg.ffn_dim), nn.ReLU(inplace=True), nn.Linear(cfg.ffn_dim, c))
        self.ffn_norm = nn.LayerNorm(c)
        self.cls_head = _head(c, cfg.num_classes)
        self.mask_head = _head(c, c)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.prior = LocalityPrior(c) if cfg.kernel_init == "centers" else None
        # Focal-loss prior: start every class at p = 0.01 so the many background
        # kernels do not swamp the first updates (with "centers" kernels, the centre logits
        # added to this head already start there).
        nn.init.constant_(self.cls_head[-1].bias, 0.0 if cfg.kernel_init == "centers" else -math.log(99.0))

    def forward(
        self, x: torch.Tensor, kernels: torch.Tensor, masks: torch.Tensor, centres: torch.Tensor | None = None,
        centre_logits: torch.Tensor | None = None, mask_feats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """centres [B,N,2]: the kernels' starting cells, centre_logits [B,N,1]: the centre map's
        logit there (kernel_init "centers"; else None). Every class logit adds it: the dense,
        class-agnostic centre map learns objectness from every pixel, far faster than N kernels do;
        which class it is stays the class head's call, from the features pooled under the mask.
        mask_feats [B,C,2h,2w] (the last stage with mask_stride 4): stride-4 detail added to the
        upsampled features, so the new masks are made at stride 4."""
        xt = self.feat_transform(x)
        group = mask_pool(masks, xt)
        k = self.updator(group, kernels)
        k = self.attn_norm(k + self.attn(k, k, k, need_weights=False)[0])
        k = self.ffn_norm(k + self.ffn(k))
        logits = self.cls_head(k)
        if centre_logits is not None:
            logits = logits + centre_logits
        xm = xt if mask_feats is None else mask_feats + F.interpolate(
            xt, size=mask_feats.shape[-2:], mode="bilinear", align_corners=False)
        new_masks = torch.einsum("bnc,bchw->bnhw", self.mask_head(k), xm)
        if self.prior is not None and centres is not None:
            cell = xm.shape[-2] // xt.shape[-2]
            new_masks = new_masks + self.prior(k, centres, (xm.shape[-2], xm.shape[-1]), cell)
        return k, new_masks, logits


class KNet(nn.Module):
    """MobileNetV2 + FPN + semantic FPN + initial kernels + S update stages.

    forward(images [B,3,H,W], kernel_prompts) -> KNetOutputs with masks at stride 8 (logits); the last
    stage's at stride 4 with mask_stride 4.
    `kernel_prompts` (UPLVP pre-training only): None, a tensor [B,N,C], or a callable
    (FPN levels P2..P5, initial kernels [B,N,C]) -> [B,N,C] (models.uplvp.prompts.Prompter). The
    prompts are added to the initial kernels after the initial masks are made, so the
    initial-kernel losses (and the stage-1 assignment, made on the initial masks) never see them.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, g = cfg.width, cfg.gn_groups
        self.backbone = MobileNetV2Backbone(cfg.backbone_weights == "imagenet", cfg.frozen_backbone_stages,
                                            classifier_features=cfg.class_from_backbone)
        sep = cfg.neck_conv == "separable"
        self.fpn = FPN(self.backbone.out_channels, c, cfg.light_p2, sep)
        self.sem_fpn = SemanticFPN(c, g, sep)
        self.loc_conv = conv_gn_relu(c, c, 1, g)
        self.seg_conv = conv_gn_relu(c, c, 1, g)
        self.init_kernels = nn.Conv2d(c, cfg.num_kernels, 1, bias=False)
        self.conv_seg = nn.Conv2d(c, cfg.num_classes, 1)
        nn.init.normal_(self.init_kernels.weight, std=cfg.init_kernel_std or 1.0 / math.sqrt(c))
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.constant_(self.conv_seg.bias, -math.log(99.0))
        if cfg.kernel_init == "centers":
            # one class-agnostic map: a per-class one classifies from a single pixel, and gave the 7
            # classes of endangered_animals a class-aware AP far below its class-agnostic AP (7.6 vs 28.7 %)
            self.center_head = nn.Sequential(conv_gn_relu(c, c, 3, g, separable=sep), nn.Conv2d(c, 1, 1))
            self.center_proj = nn.Linear(c, c)
            self.center_prior = LocalityPrior(c)
            nn.init.normal_(self.center_head[-1].weight, std=0.01)
            nn.init.constant_(self.center_head[-1].bias, -math.log(99.0))
        if cfg.mask_stride == 4:
            # stride-4 detail for the last stage's masks: a 1x1 conv of P2 (a 3x3 one at stride 4
            # would be the network's largest conv, see light_p2) added to the upsampled stride-8
            # features. Its norm starts at zero, so the stride-4 masks start as the stride-8 ones
            # upsampled and learn the detail from there; no ReLU, so that zero start still learns.
            self.mask_p2 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.GroupNorm(g, c))
            nn.init.zeros_(self.mask_p2[1].weight)
        if cfg.class_from_backbone:
            self.class_probe = ClassProbe(1280, cfg.num_classes)
        self.stages = nn.ModuleList(KernelUpdateStage(cfg) for _ in range(cfg.num_stages))

    def features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (FPN levels P2..P5, loc [B,C,h,w], sem [B,C,h,w], and with class_from_backbone
        the backbone's ImageNet classifier features [B,1280,H/32,W/32], else None)."""
        feats = self.backbone(images)
        imagenet = self.backbone.semantic(feats["c5"]) if self.cfg.class_from_backbone else None
        pyramid = self.fpn(feats)
        loc, sem = self.sem_fpn(pyramid)
        return pyramid, self.loc_conv(loc), self.seg_conv(sem), imagenet

    def centre_kernels(self, loc: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """kernel_init "centers": each kernel starts as the feature at one predicted object centre
        (the selection is not differentiable; the features it picks are), plus its learnt vector.

        loc [B,C,h,w], weight [N,C] -> (kernels [B,N,C], initial masks [B,N,h,w] with the locality
        prior, centres [B,N,2] (y, x cells), centre logits at the centres [B,N,1], centre map [B,1,h,w]).
        """
        centers = self.center_head(loc)  # [B,1,h,w]
        idx = select_peaks(centers.detach().sigmoid()[:, 0], weight.shape[0])  # [B,N]
        first = self.center_proj(_at_cells(loc, idx)) + weight  # [B,N,C]
        grid = (loc.shape[-2], loc.shape[-1])
        # the cells' (y, x) read off a coordinate map rather than idx // w and idx % w: the same numbers,
        # and an ONNX export with a dynamic width cannot take a remainder by it (models.engine.export)
        ys = torch.arange(grid[0], device=loc.device, dtype=loc.dtype)[:, None].expand(grid)
        xs = torch.arange(grid[1], device=loc.device, dtype=loc.dtype)[None, :].expand(grid)
        centres = _at_cells(torch.stack((ys, xs))[None].expand(loc.shape[0], -1, -1, -1), idx)  # [B,N,2]
        init_masks = torch.einsum("bnc,bchw->bnhw", first, loc) + self.center_prior(first, centres, grid)
        return first, init_masks, centres, _at_cells(centers, idx), centers

    def forward(self, images: torch.Tensor, kernel_prompts: PromptSource = None) -> KNetOutputs:
        pyramid, loc, sem, imagenet = self.features(images)
        out: KNetOutputs = {}
        weight = self.init_kernels.weight.flatten(1)  # [N,C]
        if self.cfg.kernel_init == "centers":
            first, init_masks, centres, centre_logits, out["centers"] = self.centre_kernels(loc, weight)
        else:
            first, centres, centre_logits = weight.unsqueeze(0), None, None
            init_masks = self.init_kernels(loc)  # [B,N,h,w]
        sem_seg = self.conv_seg(sem)  # [B,K,h,w]
        x = sem + loc
        kernels = first + mask_pool(init_masks, x, self.cfg.init_pool == "mean")  # [B,N,C]
        if callable(kernel_prompts):
            kernel_prompts = kernel_prompts(pyramid, kernels)
        if kernel_prompts is not None:
            kernels = kernels + kernel_prompts
        masks = init_masks
        fine = self.mask_p2(pyramid[0]) if self.cfg.mask_stride == 4 else None  # [B,C,2h,2w]
        stages = []
        for i, stage in enumerate(self.stages):
            last = i == len(self.stages) - 1
            kernels, masks, logits = stage(x, kernels, masks, centres, centre_logits, fine if last else None)
            if imagenet is not None:
                logits = logits + self.class_probe(imagenet, masks)
            stages.append({"masks": masks, "logits": logits})
        out.update(init_masks=init_masks, sem_seg=sem_seg, stages=stages)
        return out


class KNetSegmenter(nn.Module):
    """K-Net with its criterion behind the interface the training loop and predictor use:

    - ``compute_losses(images [B,3,H,W], targets) -> {name: loss}`` with the weighted sum under "loss";
    - ``detect(images, input_sizes) -> list[Detections]`` (see models/predict.py).
    """

    def __init__(self, net: KNet, criterion: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.criterion = criterion
        self.cfg = net.cfg

    @property
    def backbone(self) -> MobileNetV2Backbone:
        return self.net.backbone

    def compute_losses(
        self, images: torch.Tensor, targets: list[dict], kernel_prompts: PromptSource = None
    ) -> dict[str, torch.Tensor]:
        losses = self.criterion(self.net(images, kernel_prompts), targets)
        losses["loss"] = self.criterion.total(losses)
        return losses

    def detect(self, images: torch.Tensor, input_sizes: list[tuple[int, int]]) -> list[dict]:
        from models.engine.predict import knet_detections

        return knet_detections(self.net(images), input_sizes, self.cfg.max_per_image, self.cfg.mask_threshold,
                               self.cfg.rescore, self.cfg.nms)


def build_knet(cfg: ModelConfig) -> KNetSegmenter:
    from models.nets.criterion import build_criterion

    cfg.validate()
    return KNetSegmenter(KNet(cfg), build_criterion(cfg.num_classes, one_to_many=cfg.one_to_many))
