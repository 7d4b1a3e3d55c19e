"""Datasets (annotated COCO images, image folders) and variable-size batching grouped by orientation."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from models.data.coco import IMAGE_EXTENSIONS, CocoAnnotations, load_image
from models.data.masks import decode_masks, encode_masks, segmentation_to_mask
from models.data.transforms import (
    TransformConfig,
    boxes_from_masks,
    crop_window,
    paste_instances,
    photometric_jitter,
    preprocess_image,
    rescale_mask,
    resize_mask,
    resized_shape,
    to_tensor,
)
from models.errors import DataError

# --------------------------------------------------------------------------- datasets


@dataclass
class Sample:
    """One image and its instance targets, resized (not padded)."""

    image: torch.Tensor  # float [3, h, w], ImageNet-normalised
    masks: torch.Tensor  # uint8 [G, h, w] in {0, 1}
    labels: torch.Tensor  # int64 [G], contiguous class indices
    boxes: torch.Tensor  # float [G, 4] xyxy in resized pixels, tight around each mask
    image_id: int
    orig_size: tuple[int, int]  # (H, W) of the original image
    input_size: tuple[int, int]  # (h, w) after resize, before padding
    file_name: str
    iscrowd: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # bool [G]


class _Decoded(NamedTuple):
    """One image as CocoDataset caches it: resized once, masks as RLEs at the same size."""

    image: Image.Image  # RGB, at the largest size the dataset uses
    masks: list[dict]  # COCO RLEs at that size, one per wanted instance
    labels: list[int]
    crowd: list[bool]
    orig_size: tuple[int, int]  # (H, W) of the file


class CocoDataset(torch.utils.data.Dataset):
    """Images and instance targets of a CocoAnnotations, resized for the model.

    Training: random horizontal flip, crowd regions dropped from the targets (K-Net/mmdet
    ignore them; COCOeval handles them at evaluation), images without instances skipped.
    Evaluation (train=False): every image, every annotation (crowd ones flagged in `iscrowd`).
    Instances whose mask vanishes in the resize are dropped. Decoded images are cached in memory
    up to `cache_mb` (each at the largest size the dataset uses, masks run-length encoded).
    """

    def __init__(self, annotations: CocoAnnotations, transform: TransformConfig, train: bool,
                 skip_empty: bool | None = None, cache_mb: float = 1024.0) -> None:
        self.ann = annotations
        self.transform = transform
        self.train = train
        self.cache_mb = cache_mb  # decoded images kept in memory (see _decoded); 0: none
        self._cache: dict[int, _Decoded] = {}
        self._cache_bytes = 0
        skip = train if skip_empty is None else skip_empty
        self.images = [im for im in annotations.images
                       if not skip or any(not a["iscrowd"] for a in annotations.annotations_for(im["id"]))]
        if not self.images:
            raise DataError(f"{annotations.ann_file}: no image has a non-crowd annotation to train on")
        # copy-paste never makes an image fuller than the fullest one of the set: the model's kernels follow
        # that count (models.pipeline.kernels_for), and a pasted instance past it would have none to learn it
        self.max_instances = annotations.max_instances()

    def _wanted(self, ann: dict) -> bool:
        return not (self.train and ann["iscrowd"])

    def __len__(self) -> int:
        return len(self.images)

    def _decoded(self, i: int) -> _Decoded:
        """Image i decoded once at the largest size this dataset ever uses, with its wanted
        instances' masks at that size (RLE), kept in memory while the cache has room.

        Decoding a photo and rasterising its polygons at full resolution cost more than the
        model's step on small images; every epoch (and every evaluation) would redo it.
        """
        hit = self._cache.get(i)
        if hit is not None:
            return hit
        info = self.images[i]
        path = self.ann.image_path(info)
        img = load_image(path)
        H, W = info["height"], info["width"]
        if (img.height, img.width) != (H, W):
            hint = " (after applying its EXIF orientation)" if (img.height, img.width) == (W, H) else ""
            raise DataError(f"{path}: image is {img.height}x{img.width} (HxW){hint} but "
                            f"{self.ann.ann_file.name} says {H}x{W}")
        largest = self.transform.scaled(self.transform.scale_range[1]) if self.train else self.transform
        h, w = resized_shape(H, W, largest)
        masks, labels, crowd = [], [], []
        for a in self.ann.annotations_for(info["id"]):
            if not self._wanted(a):
                continue
            # Annotations were validated at load, so decoding cannot fail here.
            m = resize_mask(segmentation_to_mask(a["segmentation"], H, W), (h, w))
            if not m.any():
                continue
            masks.append(m)
            labels.append(self.ann.label_of(a))
            crowd.append(bool(a["iscrowd"]))
        item = _Decoded(img if (h, w) == (H, W) else img.resize((w, h), Image.BILINEAR),
                        encode_masks(np.stack(masks)) if masks else [], labels, crowd, (H, W))
        size = 3 * h * w + sum(len(r["counts"]) for r in item.masks)
        if self._cache_bytes + size <= self.cache_mb * 2**20:
            self._cache[i] = item
            self._cache_bytes += size
        return item

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[bool], tuple[int, int]]:
        """Image i resized (with this sample's scale jitter, photometric jitter and flip when
        training): (image [3,h,w], masks uint8 [G,h,w], labels, crowd flags, (H, W) original)."""
        item = self._decoded(i)
        (H, W), img = item.orig_size, item.image
        transform = self.transform
        if self.train:
            transform = transform.scaled(random.uniform(*transform.scale_range))
        h, w = resized_shape(H, W, transform)
        if (img.height, img.width) != (h, w):
            img = img.resize((w, h), Image.BILINEAR)
        masks = [rescale_mask(m, (h, w)) for m in decode_masks(item.masks)]
        if self.train and transform.crop and (h > transform.crop or w > transform.crop):
            y0, x0, h, w = crop_window(h, w, transform.crop, masks, random)  # type: ignore[arg-type]
            img = img.crop((x0, y0, x0 + w, y0 + h))
            masks = [m[y0:y0 + h, x0:x0 + w] for m in masks]
        if self.train:
            # jitter the resized image: on a 12-megapixel photo it would cost more than the step
            img = photometric_jitter(img, transform.photometric, random)  # type: ignore[arg-type]
        x = to_tensor(img)
        keep = [k for k, m in enumerate(masks) if m.any()]  # a mask can vanish at a smaller jittered scale
        m = torch.from_numpy(np.stack([masks[k] for k in keep])) if keep else torch.zeros(0, h, w, dtype=torch.uint8)
        labels, crowd = [item.labels[k] for k in keep], [item.crowd[k] for k in keep]
        if self.train and random.random() < transform.flip_prob:
            x, m = x.flip(-1), m.flip(-1)
        return x, m, labels, crowd, (H, W)

    def __getitem__(self, i: int) -> Sample:
        info = self.images[i]
        x, m, labels, crowd, orig = self._load(i)
        if self.train and len(self.images) > 1 and random.random() < self.transform.copy_paste:
            j = random.randrange(len(self.images) - 1)
            xs, ms, labels_s, crowd_s, _ = self._load(j + (j >= i))
            chosen: list[int] = []
            if len(labels_s):
                chosen = [k for k in range(len(labels_s)) if random.random() < 0.5] or [random.randrange(len(labels_s))]
                chosen = chosen[:max(0, self.max_instances - len(labels))]
            if chosen:
                x, m, keep = paste_instances(x, m, xs, ms[chosen])
                kept = keep.tolist()
                labels = [v for v, k in zip(labels + [labels_s[c] for c in chosen], kept) if k]
                crowd = [v for v, k in zip(crowd + [crowd_s[c] for c in chosen], kept) if k]
        h, w = x.shape[-2:]
        return Sample(x.contiguous(), m.contiguous(), torch.tensor(labels, dtype=torch.int64), boxes_from_masks(m),
                      int(info["id"]), orig, (int(h), int(w)), info["file_name"], torch.tensor(crowd, dtype=torch.bool))


class ImageItem(NamedTuple):
    """One preprocessed image for inference."""

    image: torch.Tensor  # float [3, h, w], ImageNet-normalised
    input_size: tuple[int, int]  # (h, w) after resize
    orig_size: tuple[int, int]  # (H, W) of the image as loaded (EXIF orientation applied)
    path: Path


def list_images(folder: str | Path) -> list[Path]:
    """Image files (by extension) directly in `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images to segment: a list of paths, one path, or a folder (its image files, sorted); no flip."""

    def __init__(self, paths: Sequence[str | Path] | str | Path, transform: TransformConfig) -> None:
        if isinstance(paths, (str, Path)) and Path(paths).is_file():
            paths = [paths]
        if isinstance(paths, (str, Path)):
            self.paths = list_images(paths)
            if not self.paths:
                raise DataError(f"{paths}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        else:
            self.paths = [Path(p) for p in paths]
            missing = [str(p) for p in self.paths if not p.is_file()]
            if missing:
                raise DataError(f"{missing[0]}: image file not found"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> ImageItem:
        img = load_image(self.paths[i])
        x, size = preprocess_image(img, self.transform)
        return ImageItem(x, size, (img.height, img.width), self.paths[i])


# --------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """Padded images and per-image targets (what `collate` returns)."""

    images: torch.Tensor  # float [B, 3, Hp, Wp], zero-padded at bottom/right
    targets: list[dict] = field(default_factory=list)  # masks [G,Hp,Wp], labels [G], boxes [G,4], ...

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on `device`; non_blocking copies overlap with compute when the loader pins memory."""
        moved = [{k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v) for k, v in t.items()}
                 for t in self.targets]
        return Batch(self.images.to(device, non_blocking=non_blocking), moved)

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader calls this with pin_memory=True)."""
        pinned = [{k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in t.items()} for t in self.targets]
        return Batch(self.images.pin_memory(), pinned)


def padded_shape(shapes: Sequence[tuple[int, int]], divisor: int = 32) -> tuple[int, int]:
    """Smallest (Hp, Wp) that holds every (h, w) and is a multiple of `divisor`."""
    hp = max(s[0] for s in shapes)
    wp = max(s[1] for s in shapes)
    return int(math.ceil(hp / divisor) * divisor), int(math.ceil(wp / divisor) * divisor)


def collate_images(images: list[torch.Tensor], size_divisor: int = 32) -> torch.Tensor:
    """[3, h_i, w_i] tensors -> [B, 3, Hp, Wp], zero-padded at bottom/right (0 = the mean after normalising)."""
    if not images:
        raise ValueError("collate_images: no images")
    hp, wp = padded_shape([tuple(x.shape[-2:]) for x in images], size_divisor)
    out = images[0].new_zeros(len(images), images[0].shape[0], hp, wp)
    for i, x in enumerate(images):
        out[i, :, : x.shape[1], : x.shape[2]] = x
    return out


def collate(samples: list[Sample], size_divisor: int = 32) -> Batch:
    """Samples -> Batch; each target's masks are padded like its image ([G, Hp, Wp])."""
    images = collate_images([s.image for s in samples], size_divisor)
    hp, wp = images.shape[-2:]
    targets = []
    for s in samples:
        m = s.masks.new_zeros(s.masks.shape[0], hp, wp)
        m[:, : s.masks.shape[1], : s.masks.shape[2]] = s.masks
        crowd = s.iscrowd if len(s.iscrowd) == len(s.labels) else torch.zeros(len(s.labels), dtype=torch.bool)
        targets.append({"masks": m, "labels": s.labels, "boxes": s.boxes, "iscrowd": crowd, "image_id": s.image_id,
                        "orig_size": s.orig_size, "input_size": s.input_size, "file_name": s.file_name})
    return Batch(images, targets)


class ImageBatch(NamedTuple):
    """Padded images for inference (what `collate_items` returns)."""

    images: torch.Tensor  # float [B, 3, Hp, Wp], zero-padded at bottom/right
    input_sizes: list[tuple[int, int]]  # (h, w) of each image inside the padding
    orig_sizes: list[tuple[int, int]]  # (H, W) of each original image
    paths: list[Path]


def collate_items(items: list[ImageItem], size_divisor: int = 32) -> ImageBatch:
    """ImageFolderDataset items -> ImageBatch."""
    return ImageBatch(collate_images([it.image for it in items], size_divisor), [it.input_size for it in items],
                      [it.orig_size for it in items], [it.path for it in items])


def aspect_grouped_batches(landscape: list[bool], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled batches of indices whose images share an orientation (mmdet's GroupSampler idea).

    A portrait and a landscape image in one batch pad to a square: nearly twice the
    pixels, time and memory for nothing.
    """
    batches: list[list[int]] = []
    for flag in (True, False):
        idx = [i for i, f in enumerate(landscape) if f == flag]
        idx = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
        batches += [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]


class AspectGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """`aspect_grouped_batches`, drawn afresh from `gen` on every pass (epoch)."""

    def __init__(self, landscape: list[bool], batch_size: int, gen: torch.Generator) -> None:
        self.landscape, self.batch_size, self.gen = list(landscape), batch_size, gen

    def __iter__(self) -> Iterator[list[int]]:
        return iter(aspect_grouped_batches(self.landscape, self.batch_size, self.gen))

    def __len__(self) -> int:
        n_land = sum(self.landscape)
        return math.ceil(n_land / self.batch_size) + math.ceil((len(self.landscape) - n_land) / self.batch_size)


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool, seed: int,
                num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader of `collate`d Batches (ImageBatches for an ImageFolderDataset), shuffled from `seed`.

    Shuffled batches of a dataset with image sizes (CocoDataset) are grouped by
    orientation. Padding follows the dataset's ``transform.size_divisor`` (default 32).
    `pin_memory` (for a GPU) puts batches in page-locked memory so that their copy overlaps compute.
    """
    gen = torch.Generator().manual_seed(seed)
    transform = getattr(dataset, "transform", None)
    divisor = getattr(transform, "size_divisor", 32)
    collate_fn = partial(collate_items if isinstance(dataset, ImageFolderDataset) else collate, size_divisor=divisor)
    images = getattr(dataset, "images", None)
    if shuffle and batch_size > 1 and images is not None:
        landscape = [int(im["width"]) >= int(im["height"]) for im in images]
        return torch.utils.data.DataLoader(dataset, batch_sampler=AspectGroupedBatchSampler(landscape, batch_size, gen),
                                           collate_fn=collate_fn, num_workers=num_workers, generator=gen,
                                           pin_memory=pin_memory)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory)
