"""K-Net: initial kernels from a semantic-FPN, then S dynamic kernel-update stages (method.md §5).

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

KNetOutputs = dict  # {"init_masks": [B,N,h,w], "sem_seg": [B,K,h,w], "stages": [{"masks","logits"}] * S}
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
        # Focal-loss prior: start every class at p = 0.01 so the many background
        # kernels do not swamp the first updates.
        nn.init.constant_(self.cls_head[-1].bias, -math.log(99.0))

    def forward(
        self, x: torch.Tensor, kernels: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xt = self.feat_transform(x)
        group = mask_pool(masks, xt)
        k = self.updator(group, kernels)
        k = self.attn_norm(k + self.attn(k, k, k, need_weights=False)[0])
        k = self.ffn_norm(k + self.ffn(k))
        logits = self.cls_head(k)
        new_masks = torch.einsum("bnc,bchw->bnhw", self.mask_head(k), xt)
        return k, new_masks, logits


class KNet(nn.Module):
    """MobileNetV2 + FPN + semantic FPN + initial kernels + S update stages.

    forward(images [B,3,H,W], kernel_prompts) -> KNetOutputs with masks at stride 8 (logits).
    `kernel_prompts` (UPLVP pre-training only): None, a tensor [B,N,C], or a callable
    (FPN levels P2..P5, initial kernels [B,N,C]) -> [B,N,C] (models.uplvp.prompts.Prompter). The
    prompts are added to the initial kernels after the initial masks are made, so the
    initial-kernel losses (and the stage-1 assignment, made on the initial masks) never see them.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, g = cfg.width, cfg.gn_groups
        self.backbone = MobileNetV2Backbone(cfg.backbone_weights == "imagenet", cfg.frozen_backbone_stages)
        self.fpn = FPN(self.backbone.out_channels, c, cfg.light_p2)
        self.sem_fpn = SemanticFPN(c, g)
        self.loc_conv = conv_gn_relu(c, c, 1, g)
        self.seg_conv = conv_gn_relu(c, c, 1, g)
        self.init_kernels = nn.Conv2d(c, cfg.num_kernels, 1, bias=False)
        self.conv_seg = nn.Conv2d(c, cfg.num_classes, 1)
        nn.init.normal_(self.init_kernels.weight, std=cfg.init_kernel_std or 1.0 / math.sqrt(c))
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.constant_(self.conv_seg.bias, -math.log(99.0))
        self.stages = nn.ModuleList(KernelUpdateStage(cfg) for _ in range(cfg.num_stages))

    def features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Returns (FPN levels P2..P5, loc [B,C,h,w], sem [B,C,h,w])."""
        pyramid = self.fpn(self.backbone(images))
        loc, sem = self.sem_fpn(pyramid)
        return pyramid, self.loc_conv(loc), self.seg_conv(sem)

    def forward(self, images: torch.Tensor, kernel_prompts: PromptSource = None) -> KNetOutputs:
        pyramid, loc, sem = self.features(images)
        init_masks = self.init_kernels(loc)  # [B,N,h,w]
        sem_seg = self.conv_seg(sem)  # [B,K,h,w]
        x = sem + loc
        weight = self.init_kernels.weight.flatten(1)  # [N,C]
        kernels = weight.unsqueeze(0) + mask_pool(init_masks, x, self.cfg.init_pool == "mean")  # [B,N,C]
        if callable(kernel_prompts):
            kernel_prompts = kernel_prompts(pyramid, kernels)
        if kernel_prompts is not None:
            kernels = kernels + kernel_prompts
        masks = init_masks
        stages = []
        for stage in self.stages:
            kernels, masks, logits = stage(x, kernels, masks)
            stages.append({"masks": masks, "logits": logits})
        return {"init_masks": init_masks, "sem_seg": sem_seg, "stages": stages}


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
