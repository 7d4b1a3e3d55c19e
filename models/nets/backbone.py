"""MobileNetV2 (ImageNet) -> multi-scale features C2..C5 at strides 4, 8, 16, 32."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn

from models.nets.weights import ensure_mobilenet_weights

# Slices of torchvision's `mobilenet_v2().features` ending at each stride; the last
# 1x1 conv to 1280 channels (features[18]) is a classifier neck and is dropped.
_STAGES: tuple[tuple[int, int], ...] = ((0, 2), (2, 4), (4, 7), (7, 14), (14, 18))
OUT_CHANNELS: tuple[int, ...] = (24, 32, 96, 320)  # C2, C3, C4, C5


class MobileNetV2Backbone(nn.Module):
    """Returns ``{"c2": [B,24,H/4,W/4], "c3": [B,32,H/8,W/8], "c4": [B,96,H/16,W/16], "c5": [B,320,H/32,W/32]}``.

    BatchNorm layers always run in eval mode: batches of 2 images give useless batch
    statistics (the reference keeps `norm_eval=True` for the same reason).
    """

    out_channels = OUT_CHANNELS

    def __init__(self, pretrained: bool, frozen_stages: int = 1, classifier_features: bool = False) -> None:
        super().__init__()
        weights = None
        if pretrained:
            ensure_mobilenet_weights()
            weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
        features = torchvision.models.mobilenet_v2(weights=weights).features
        self.stages = nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in _STAGES)
        # classifier_features: keep the 1x1 conv to 1280 channels that ImageNet's classifier reads
        # (`semantic`), the most class-specific features the backbone has
        self.head = features[18] if classifier_features else None
        self.set_frozen(frozen_stages)

    def train(self, mode: bool = True) -> "MobileNetV2Backbone":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                out[f"c{i + 1}"] = x
        return out

    def semantic(self, c5: torch.Tensor) -> torch.Tensor:
        """C5 [B,320,h,w] -> ImageNet classifier features [B,1280,h,w] (classifier_features only)."""
        if self.head is None:
            raise RuntimeError("this backbone was built without classifier_features")
        return self.head(c5)

    def set_frozen(self, frozen_stages: int) -> None:
        """Freeze the first `frozen_stages` stages (5 = the whole backbone, as in pre-training; the
        classifier head goes with the last stage)."""
        self.frozen_stages = frozen_stages
        for i, stage in enumerate(self.stages):
            for p in stage.parameters():
                p.requires_grad_(i >= frozen_stages)
        if self.head is not None:
            for p in self.head.parameters():
                p.requires_grad_(frozen_stages < len(self.stages))


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into the conv (inference only).

    BatchNorm in eval mode is an affine map, so conv+BN is one conv with rescaled weights:
    the same outputs with one pass over the feature map instead of two. Modifies `module`
    in place and returns it; do not train or save a fused model.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.modules():
        if not isinstance(child, nn.Sequential):
            continue
        names = list(child._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = child._modules[a], child._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not bn.training:
                child._modules[a] = fuse_conv_bn_eval(conv, bn)
                child._modules[b] = nn.Identity()
    return module
