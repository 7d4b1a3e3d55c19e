"""FPN + semantic-FPN neck: C2..C5 -> P2..P5 -> stride-8 mask features (method.md §5.1-5.2)."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def conv(cin: int, cout: int, k: int, stride: int = 1, separable: bool = False, bias: bool = True) -> nn.Module:
    """A k x k conv, or (separable, k > 1) a depthwise k x k followed by a pointwise 1 x 1: ~k^2 times
    fewer multiply-adds at the neck's width (MobileNet's factorisation, ModelConfig.neck_conv)."""
    if not separable or k == 1:
        return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)
    return nn.Sequential(nn.Conv2d(cin, cin, k, stride=stride, padding=k // 2, groups=cin, bias=False),
                         nn.Conv2d(cin, cout, 1, bias=bias))


def conv_gn_relu(cin: int, cout: int, k: int, groups: int, stride: int = 1, separable: bool = False) -> nn.Sequential:
    return nn.Sequential(
        conv(cin, cout, k, stride, separable, bias=False),
        nn.GroupNorm(groups, cout),
        nn.ReLU(inplace=True),
    )


class FPN(nn.Module):
    """Top-down feature pyramid: ``{"c2".."c5"}`` -> ``[P2, P3, P4, P5]``, each [B, width, H/s, W/s]."""

    def __init__(self, in_channels: tuple[int, ...], width: int, light_p2: bool = False,
                 separable: bool = False) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        # light_p2: P2 is its lateral plus the top-down path, with no 3x3 output conv at stride 4
        self.output = nn.ModuleList(nn.Identity() if light_p2 and i == 0 else conv(width, width, 3, separable=separable)
                                    for i in range(len(in_channels)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: "OrderedDict[str, torch.Tensor]") -> list[torch.Tensor]:
        xs = list(feats.values())
        lat = [conv(x) for conv, x in zip(self.lateral, xs)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output, lat)]


def sine_position_encoding(b: int, h: int, w: int, channels: int, device: torch.device) -> torch.Tensor:
    """DETR-style normalised sine/cosine encoding of (y, x): [B, channels, H, W].

    K-Net adds it to P5 so the kernels can tell positions apart (identical objects
    at different places would otherwise have identical features).
    """
    half = channels // 2
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32)[:, None].expand(h, w)
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32)[None, :].expand(h, w)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (h + eps) * scale
    x = x / (w + eps) * scale
    dim_t = torch.arange(half, device=device, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / half)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=3).flatten(2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=3).flatten(2)
    pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)
    return pos.unsqueeze(0).expand(b, -1, -1, -1)


class SemanticFPN(nn.Module):
    """Fuses P2..P5 at stride 8 and returns ``(loc, sem)``, both [B, width, H/8, W/8].

    P2: one stride-2 conv. P3: one conv. P4: conv, up x2, conv. P5 (+ sine position
    encoding): conv, up x2, conv, up x2, conv. The four maps are summed; `loc` feeds
    the kernels' masks, `sem` the semantic branch.
    """

    def __init__(self, width: int, groups: int, separable: bool = False) -> None:
        super().__init__()
        c, sep = width, separable
        self.p2 = conv_gn_relu(c, c, 3, groups, stride=2, separable=sep)
        self.p3 = conv_gn_relu(c, c, 3, groups, separable=sep)
        self.p4 = nn.ModuleList([conv_gn_relu(c, c, 3, groups, separable=sep) for _ in range(2)])
        self.p5 = nn.ModuleList([conv_gn_relu(c, c, 3, groups, separable=sep) for _ in range(3)])
        self.loc_out = conv_gn_relu(c, c, 1, groups)
        self.sem_out = conv_gn_relu(c, c, 1, groups)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, p: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        p2, p3, p4, p5 = p
        size = p3.shape[-2:]
        x = self.p2(p2)
        x = x[..., : size[0], : size[1]] + self.p3(p3)
        y = self.p4[1](self._up(self.p4[0](p4)))
        x = x + y[..., : size[0], : size[1]]
        b, c, h, w = p5.shape
        z = p5 + sine_position_encoding(b, h, w, c, p5.device).to(p5.dtype)
        z = self.p5[2](self._up(self.p5[1](self._up(self.p5[0](z)))))
        x = x + z[..., : size[0], : size[1]]
        return self.loc_out(x), self.sem_out(x)
