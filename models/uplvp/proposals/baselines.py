"""Two trivial, language-free proposal generators the benchmark compares the engines against.

  grid      boxes as masks on a fixed pyramid (1x1, 2x2, 3x3, ... cells), coarse first and, within
            a level, nearest to the image centre first (photographers centre their subjects);
  saliency  connected components of an objectness map: the energy (channel mean) of the same
            MobileNetV2 dense features the offline engine uses, thresholded at several levels.
Both label every mask "object": they say where, not what.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.uplvp.proposals.base import PseudoMask
from models.uplvp.proposals.offline import DenseMobileNet, OfflineConfig, _to_input
from models.uplvp.proposals.postprocess import (
    greedy_dedupe,
    level_components,
    normalise01,
)

AGNOSTIC = "object"


class GridEngine:
    """Boxes of a fixed multi-scale grid, as masks."""

    name = "grid"
    vocabulary = [AGNOSTIC]

    def propose(self, image: Image.Image, max_masks: int) -> list[PseudoMask]:
        W, H = image.size
        out: list[PseudoMask] = []
        n = 1
        while len(out) < max_masks:
            cells = [(i, j) for i in range(n) for j in range(n)]
            cells.sort(key=lambda c: abs(c[0] + 0.5 - n / 2) + abs(c[1] + 0.5 - n / 2))
            for i, j in cells:
                m = np.zeros((H, W), dtype=bool)
                m[round(i * H / n): round((i + 1) * H / n), round(j * W / n): round((j + 1) * W / n)] = True
                out.append(PseudoMask(m, AGNOSTIC, 1.0 / n))
            n += 1
        return out[:max_masks]


class SaliencyEngine:
    """Connected components of the MobileNetV2 feature-energy map at several thresholds."""

    name = "saliency"
    vocabulary = [AGNOSTIC]

    def __init__(self, levels: tuple[float, ...] = (0.3, 0.45, 0.6, 0.75), min_area_frac: float = 0.005) -> None:
        self.net = DenseMobileNet()
        self.cfg = OfflineConfig()
        self.levels = levels
        self.min_area_frac = min_area_frac

    @torch.inference_mode()
    def propose(self, image: Image.Image, max_masks: int) -> list[PseudoMask]:
        W, H = image.size
        energy = normalise01(self.net(_to_input(image, self.cfg))[0].mean(0))
        sal = F.interpolate(energy[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()
        comps = level_components(sal, self.levels, self.min_area_frac * H * W)
        masks = [m for m, _ in comps]
        scores = [q * float(np.sqrt(m.sum() / (H * W))) for m, q in comps]
        if not masks:
            return []
        mt = torch.from_numpy(np.stack(masks))
        keep = greedy_dedupe(mt, torch.tensor(scores), 0.7, max_masks)
        return [PseudoMask(masks[i], AGNOSTIC, min(1.0, scores[i])) for i in keep]
