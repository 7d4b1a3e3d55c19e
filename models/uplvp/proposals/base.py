"""What every proposal engine returns and the interface it implements.

A proposal engine turns one unlabeled RGB image into at most K category-aware pseudo
instance masks (UPLVP's "Masks Proposal", method.md §2). Engines are built once per
vocabulary (text embeddings and model weights are loaded in `__init__`), then called
per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image


@dataclass
class PseudoMask:
    """One pseudo instance: a binary mask at the image's own size, a vocabulary word, a score in [0, 1]."""

    mask: np.ndarray  # bool [H, W]
    category: str
    score: float


class ProposalEngine(Protocol):
    """Anything with a `name`, the vocabulary it labels with, and `propose(image, max_masks)`."""

    name: str
    vocabulary: list[str]

    def propose(self, image: Image.Image, max_masks: int) -> list[PseudoMask]:
        """Pseudo masks for one RGB image, best first, at most `max_masks`."""
        ...
