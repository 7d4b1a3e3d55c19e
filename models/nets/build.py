"""build_model: the one place where a ModelConfig becomes a network."""

from __future__ import annotations

from torch import nn

from models.config import ModelConfig


def build_model(cfg: ModelConfig, short_side: int = 384, max_long_side: int = 640) -> nn.Module:
    """A segmenter exposing ``compute_losses(images, targets)`` and ``detect(images, input_sizes)``."""
    cfg.validate()
    if cfg.arch == "knet":
        from models.nets.knet import build_knet

        return build_knet(cfg)
    from models.nets.maskrcnn import build_maskrcnn

    return build_maskrcnn(cfg, short_side, max_long_side)
