"""Transforms: resize keeping the aspect ratio, random flip, ImageNet normalisation; mask resizing."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image, ImageEnhance

from models.data.coco import to_rgb
from models.data.masks import mask_to_bbox
from models.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- transforms


@dataclass
class TransformConfig:
    """Resize (keeping aspect), padding for batches, and the training augmentations.

    Training only (CocoDataset with train=True): random flip; scale jitter (each image's
    target size times a factor drawn from `scale_range`); photometric jitter (brightness,
    contrast, saturation by up to `photometric`); copy-paste (with chance `copy_paste`, the
    instances of another training image are pasted on top, Ghiasi et al. 2021); a random `crop` x
    `crop` window (px, after the resize; 0: none) of an image larger than that, centred so that it
    holds a randomly chosen instance (tiny objects at a large size, at the cost of a small one).
    """

    short_side: int = 384
    max_long_side: int = 640
    flip_prob: float = 0.5
    size_divisor: int = 32
    scale_range: tuple[float, float] = (1.0, 1.0)
    photometric: float = 0.0
    copy_paste: float = 0.0
    crop: int = 0

    def __post_init__(self) -> None:
        if self.short_side <= 0 or self.max_long_side <= 0:
            raise ConfigError(f"short_side and max_long_side must be positive, got {self.short_side}, "
                              f"{self.max_long_side}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.size_divisor <= 0:
            raise ConfigError(f"size_divisor must be positive, got {self.size_divisor}")
        lo, hi = self.scale_range
        if not 0.1 <= lo <= hi <= 4.0:
            raise ConfigError(f"scale_range must be 0.1 <= low <= high <= 4, got {self.scale_range}")
        if self.crop and self.crop < self.size_divisor:
            raise ConfigError(f"crop must be 0 (none) or at least {self.size_divisor} px, got {self.crop}")
        if not 0.0 <= self.photometric < 1.0 or not 0.0 <= self.copy_paste <= 1.0:
            raise ConfigError(f"photometric must be in [0, 1) and copy_paste in [0, 1], got {self.photometric}, "
                              f"{self.copy_paste}")

    def with_size(self, short_side: int, max_long_side: int) -> TransformConfig:
        """The same transform at another target size (a resumed run keeps the size it started with)."""
        return dataclasses.replace(self, short_side=short_side, max_long_side=max_long_side)

    def scaled(self, factor: float) -> TransformConfig:
        """The same transform at `factor` times the target size (scale jitter)."""
        if factor == 1.0:
            return self
        return dataclasses.replace(self, short_side=max(32, round(self.short_side * factor)),
                                   max_long_side=max(32, round(self.max_long_side * factor)))


def photometric_jitter(img: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """Brightness, contrast and saturation each times a factor in [1 - strength, 1 + strength]."""
    if strength <= 0:
        return img
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(1 - strength, 1 + strength))
    return img


def paste_instances(x: torch.Tensor, masks: torch.Tensor, src: torch.Tensor, src_masks: torch.Tensor,
                    min_visible: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy-paste: the instances `src_masks` [P,hs,ws] of image `src` [3,hs,ws] on top of `x` [3,h,w].

    The source is aligned at the top-left corner and cut to the target's size. Instances of
    the target that the paste covers are reduced to what stays visible; those left with less
    than `min_visible` of their area (or that leave the frame entirely, for pasted ones) are
    dropped. Returns (image [3,h,w], the kept masks [G',h,w]: old ones first, then pasted ones,
    and which of the G + P instances were kept, bool [G+P]).
    """
    h, w = x.shape[-2:]
    hs, ws = min(h, src.shape[-2]), min(w, src.shape[-1])
    new = masks.new_zeros(src_masks.shape[0], h, w)
    new[:, :hs, :ws] = src_masks[:, :hs, :ws]
    alpha = new.amax(0) if len(new) else masks.new_zeros(h, w)
    out = x.clone()
    a = alpha.bool()
    canvas = x.new_zeros(x.shape)
    canvas[:, :hs, :ws] = src[:, :hs, :ws]
    out[:, a] = canvas[:, a]
    before = masks.flatten(1).sum(1).float()
    visible = masks * (1 - alpha)
    keep_old = visible.flatten(1).sum(1).float() >= min_visible * before.clamp(min=1)
    keep_new = new.flatten(1).sum(1) > 0
    kept = torch.cat([visible[keep_old], new[keep_new]])
    return out, kept, torch.cat([keep_old, keep_new])


def crop_window(h: int, w: int, crop: int, masks: list[np.ndarray], rng: random.Random) -> tuple[int, int, int, int]:
    """A training crop of an image of h x w: (y0, x0, height, width), at most `crop` on each side.

    The window holds a pixel of one instance drawn at random from `masks` ([h,w] each; any window when
    there is none), placed uniformly among the windows that do, so every crop has something to learn
    from and every part of an object can land anywhere in it.
    """
    ch, cw = min(h, crop), min(w, crop)
    nonempty = [m for m in masks if m.any()]
    if not nonempty:
        return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    ys, xs = np.nonzero(rng.choice(nonempty))
    k = rng.randrange(len(ys))
    cy, cx = int(ys[k]), int(xs[k])
    y0 = rng.randint(max(0, cy - ch + 1), min(cy, h - ch))
    x0 = rng.randint(max(0, cx - cw + 1), min(cx, w - cw))
    return y0, x0, ch, cw


def resized_shape(h: int, w: int, t: TransformConfig) -> tuple[int, int]:
    """(h, w) after the resize: short side -> `short_side` unless the long side would exceed its cap."""
    scale = min(t.short_side / min(h, w), t.max_long_side / max(h, w))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def preprocess_image(img: Image.Image, transform: TransformConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """PIL image -> (float tensor [3, h, w] resized and ImageNet-normalised, (h, w)).

    The one place where model inputs are made, for training, evaluation and inference alike.
    """
    if img.mode != "RGB":
        img = to_rgb(img)
    h, w = resized_shape(img.height, img.width, transform)
    return to_tensor(img.resize((w, h), Image.BILINEAR)), (h, w)


# (x / 255 - mean) / std as one multiply-add per pixel on the uint8 values
_SCALE = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD]).view(3, 1, 1)
_SHIFT = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image at its final size -> float tensor [3, h, w], ImageNet-normalised.

    One multiply-add per pixel after the uint8 -> float conversion (it was four float passes:
    divide, subtract, divide, copy to contiguous; a fifth of the data loading's time in a
    training step).
    """
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # a writable copy, [3,h,w]
    return torch.addcmul(_SHIFT, x.float(), _SCALE)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Binary mask [H, W] -> uint8 [h, w] in {0, 1}.

    Resamples the 0/1 mask to coverage fractions and keeps pixels >= 0.5: area
    averaging when shrinking (like the image's antialiased resize; thin parts survive
    where their coverage does), bilinear when enlarging. One mask at a time, because a
    stack of full-resolution float masks of a large photo takes gigabytes.
    """
    h, w = size
    if mask.shape == (h, w):
        return mask.astype(np.uint8)
    shrink = h * w < mask.shape[0] * mask.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    frac = cv2.resize(mask.astype(np.float32), (w, h), interpolation=interp)
    return (frac >= 0.5).astype(np.uint8)


def rescale_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask already resized once (uint8 [H', W'] in {0, 1}) -> uint8 [h, w], nearest neighbour.

    For the second resize of a cached mask (scale jitter from the cached size): each pixel takes
    one source pixel, so masks that did not overlap still do not (averaging twice could give a
    boundary pixel to two instances).
    """
    h, w = size
    if mask.shape == (h, w):
        return mask
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Binary masks [G, h, w] -> float [G, 4] tight xyxy boxes in pixels (x2, y2 exclusive)."""
    out = torch.zeros(masks.shape[0], 4)
    for i, m in enumerate(masks):
        x, y, w, h = mask_to_bbox(m.numpy())
        out[i] = torch.tensor([x, y, x + w, y + h])
    return out


