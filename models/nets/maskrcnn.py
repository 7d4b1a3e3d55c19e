"""The CNN reference: torchvision's Mask R-CNN on the same MobileNetV2 (ImageNet) backbone + FPN.

It is trained and evaluated by the same loop, data and metric as K-Net, so the two can
be compared side by side (the comparison the UPLVP paper makes against Mask R-CNN).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from models.config import ModelConfig
from models.nets.backbone import MobileNetV2Backbone


class MobileNetV2FPN(nn.Module):
    """C2..C5 -> FPN levels "0".."3" (strides 4..32) + "pool" (stride 64), `out_channels` wide."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.body = MobileNetV2Backbone(cfg.backbone_weights == "imagenet", cfg.frozen_backbone_stages)
        self.fpn = FeaturePyramidNetwork(list(self.body.out_channels), cfg.width, extra_blocks=LastLevelMaxPool())
        self.out_channels = cfg.width

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), v) for i, v in enumerate(feats.values())))


class MaskRCNNSegmenter(nn.Module):
    """Adapter giving Mask R-CNN the same interface as KNetSegmenter.

    Our data pipeline already resizes and normalises, so torchvision's transform is
    set to identity normalisation and to a size range that leaves our images as they are.
    """

    def __init__(self, cfg: ModelConfig, short_side: int = 384, max_long_side: int = 640) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = MaskRCNN(
            MobileNetV2FPN(cfg),
            num_classes=cfg.num_classes + 1,  # + background at index 0
            min_size=short_side,
            max_size=max_long_side,
            image_mean=[0.0, 0.0, 0.0],
            image_std=[1.0, 1.0, 1.0],
            box_detections_per_img=cfg.max_per_image,
            box_score_thresh=0.0,  # COCO AP wants the full ranked list
        )

    @property
    def backbone(self) -> MobileNetV2Backbone:
        return self.net.backbone.body

    def _unpad(self, images: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        return [img[:, :h, :w] for img, (h, w) in zip(images, sizes)]

    def compute_losses(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        sizes = [t["input_size"] for t in targets]
        tv_targets = []
        for t, (h, w) in zip(targets, sizes):
            keep = t["boxes"][:, 2:].gt(t["boxes"][:, :2]).all(1)  # Mask R-CNN rejects degenerate boxes
            tv_targets.append(
                {"boxes": t["boxes"][keep], "labels": t["labels"][keep] + 1, "masks": t["masks"][keep, :h, :w]}
            )
        losses = self.net(self._unpad(images, sizes), tv_targets)
        losses["loss"] = sum(losses.values())
        return losses

    def detect(self, images: torch.Tensor, input_sizes: list[tuple[int, int]]) -> list[dict]:
        out = self.net(self._unpad(images, input_sizes))
        return [{"masks": o["masks"][:, 0], "scores": o["scores"], "labels": o["labels"] - 1} for o in out]


def build_maskrcnn(cfg: ModelConfig, short_side: int = 384, max_long_side: int = 640) -> MaskRCNNSegmenter:
    cfg.validate()
    return MaskRCNNSegmenter(cfg, short_side, max_long_side)
