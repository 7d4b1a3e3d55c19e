"""COCO instance data: validated reading, resize/flip/normalise transforms, variable-size batching.

Any COCO instances JSON works: polygons, uncompressed and compressed RLE, crowd regions,
any category ids (mapped to contiguous indices 0..C-1 and back). Problems are reported as
DataError naming the file and what to fix, before any training starts.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

from models.errors import ConfigError, DataError
from models.masks import mask_to_bbox, segmentation_to_rle, segmentation_to_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------- categories


@dataclass(frozen=True)
class CategoryMap:
    """COCO category ids <-> contiguous class indices 0..C-1 (in order of id)."""

    ids: tuple[int, ...]
    names: tuple[str, ...]
    _index: dict[int, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        ids, names = tuple(int(i) for i in self.ids), tuple(str(n) for n in self.names)
        if len(ids) != len(names):
            raise ValueError(f"CategoryMap: {len(ids)} ids but {len(names)} names")
        if len(set(ids)) != len(ids):
            raise ValueError(f"CategoryMap: duplicate category ids in {ids}")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(ids)})

    @classmethod
    def from_coco(cls, categories: list[dict]) -> CategoryMap:
        """From a COCO ``categories`` list (``[{"id", "name", ...}]``), sorted by id."""
        cats = sorted(categories, key=lambda c: int(c["id"]))
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c["name"]) for c in cats))

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, cat_id: int) -> int:
        """COCO category id -> contiguous index; KeyError for an id not in the map."""
        try:
            return self._index[int(cat_id)]
        except KeyError:
            raise KeyError(f"category id {cat_id} is not one of {list(self.ids)}") from None

    def id_of(self, index: int) -> int:
        """Contiguous index -> COCO category id."""
        return self.ids[index]

    def to_coco(self) -> list[dict]:
        """``[{"id": ..., "name": ...}]``, the form checkpoints and COCO files store."""
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names)]


# --------------------------------------------------------------------------- annotation file


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


class CocoAnnotations:
    """A validated COCO instances file plus the folder its images live in.

    `categories` (e.g. a checkpoint's list) maps this file's categories by *name*, so a
    val set or a new train set lines up with the classes a model already knows; a name
    that the file's annotations use and the map lacks is a DataError (listed but unused
    categories are ignored).

    After loading, everything speaks in `categories`' ids: ``raw`` (the ground truth for
    COCOeval) and ``annotations_for`` have their ``category_id`` remapped, ``iscrowd``
    defaulted to 0 and a missing ``area`` computed from the segmentation, because
    COCOeval reads both and would otherwise fail with a KeyError deep inside pycocotools.
    """

    def __init__(self, ann_file: str | Path, image_root: str | Path, categories: CategoryMap | None = None,
                 skip_missing: bool = False) -> None:
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        self.skip_missing = skip_missing  # drop (and list in `missing`) images whose file is absent
        self.missing: list[str] = []
        self._skipped_ids: set[int] = set()
        raw = self._read()
        file_cats = self._check_categories(raw["categories"])
        images = self._check_images(raw["images"])
        by_id = {im["id"]: im for im in images}
        anns = self._check_annotations(raw["annotations"], by_id, {c["id"] for c in file_cats})

        if categories is None:
            self.categories = CategoryMap.from_coco(file_cats)
            remap = {cid: cid for cid in self.categories.ids}
        else:
            self.categories = categories
            remap = self._map_by_name(file_cats, categories, anns)
        anns = [{**a, "category_id": remap[a["category_id"]]} for a in anns]

        self.images: list[dict] = images
        self.raw: dict[str, Any] = {**raw, "categories": self.categories.to_coco(), "annotations": anns}
        self._anns: dict[int, list[dict]] = {im["id"]: [] for im in images}
        for a in anns:
            self._anns[a["image_id"]].append(a)

    # -- validation steps; each raises DataError("<file>: <problem>")

    def _fail(self, msg: str) -> DataError:
        return DataError(f"{self.ann_file}: {msg}")

    def _read(self) -> dict:
        f = self.ann_file
        if not f.is_file():
            raise DataError(f"{f}: annotation file not found")
        if not self.image_root.is_dir():
            raise DataError(f"{self.image_root}: image folder not found (for annotations {f})")
        try:
            raw = json.loads(f.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._fail(f"not valid JSON ({exc})") from None
        except OSError as exc:
            raise self._fail(f"cannot read ({exc.strerror or exc})") from None
        if not isinstance(raw, dict):
            raise self._fail("not a COCO instances file (the top level must be an object)")
        for key in ("images", "annotations", "categories"):
            if not isinstance(raw.get(key), list):
                raise self._fail(f"not a COCO instances file: '{key}' must be a list")
        if not raw["images"]:
            raise self._fail("'images' is empty")
        if not raw["categories"]:
            raise self._fail("'categories' is empty")
        return raw

    def _check_categories(self, cats: list) -> list[dict]:
        ids: set[int] = set()
        names: dict[str, int] = {}
        for c in cats:
            if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
                raise self._fail(f"category entry {_short(c)} needs an integer 'id' and a string 'name'")
            if c["id"] in ids:
                raise self._fail(f"category id {c['id']} appears twice")
            if c["name"] in names:
                # Names identify classes across files and checkpoints; two with one name are ambiguous.
                raise self._fail(f"category name {c['name']!r} is used by ids {names[c['name']]} and {c['id']}")
            ids.add(c["id"])
            names[c["name"]] = c["id"]
        return cats

    def _check_images(self, images: list) -> list[dict]:
        seen: set[int] = set()
        for im in images:
            if not isinstance(im, dict) or not all(k in im for k in ("id", "file_name", "height", "width")):
                raise self._fail(f"image entry {_short(im)} needs 'id', 'file_name', 'height' and 'width'")
            if not _is_int(im["id"]):
                raise self._fail(f"image id {_short(im['id'])} must be an integer")
            if not isinstance(im["file_name"], str) or not im["file_name"]:
                raise self._fail(f"image {im['id']}: 'file_name' must be a non-empty string")
            if not (_is_int(im["height"]) and _is_int(im["width"]) and im["height"] > 0 and im["width"] > 0):
                raise self._fail(f"image {im['id']}: 'height' and 'width' must be positive integers, "
                                 f"got {_short(im['height'])} x {_short(im['width'])}")
            if im["id"] in seen:
                raise self._fail(f"image id {im['id']} appears twice")
            seen.add(im["id"])
        missing = [im["file_name"] for im in images if not (self.image_root / im["file_name"]).is_file()]
        if missing and self.skip_missing and len(missing) < len(images):
            self.missing = missing
            gone = set(missing)
            self._skipped_ids = {im["id"] for im in images if im["file_name"] in gone}
            return [im for im in images if im["file_name"] not in gone]
        if missing:
            raise self._fail(f"{len(missing)} of {len(images)} image files not found under {self.image_root}: "
                             + ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else ""))
        return images

    def _check_annotations(self, anns: list, images: dict[int, dict], cat_ids: set[int]) -> list[dict]:
        out: list[dict] = []
        ann_ids: set[int] = set()
        for pos, a in enumerate(anns):
            if not isinstance(a, dict):
                raise self._fail(f"annotation entry #{pos} is not an object: {_short(a)}")
            if not _is_int(a.get("id")):
                # COCOeval keys ground truth by id; without one it fails deep inside pycocotools.
                raise self._fail(f"annotation entry #{pos} needs an integer 'id'")
            aid = a["id"]
            if aid in ann_ids:
                raise self._fail(f"annotation id {aid} appears twice")
            ann_ids.add(aid)
            if a.get("image_id") in self._skipped_ids:
                continue  # its image file is missing and skip_missing is on
            if a.get("image_id") not in images:
                raise self._fail(f"annotation {aid} points at image id {_short(a.get('image_id'))}, "
                                 "which is not in 'images'")
            if a.get("category_id") not in cat_ids:
                raise self._fail(f"annotation {aid} has category_id {_short(a.get('category_id'))}, "
                                 "which is not in 'categories'")
            crowd = a.get("iscrowd", 0)
            if crowd not in (0, 1):
                raise self._fail(f"annotation {aid}: 'iscrowd' must be 0 or 1, got {_short(crowd)}")
            if "segmentation" not in a:
                raise self._fail(f"annotation {aid} has no 'segmentation' (polygons or RLE)")
            im = images[a["image_id"]]
            try:
                rle = segmentation_to_rle(a["segmentation"], im["height"], im["width"])
            except ValueError as exc:
                raise self._fail(f"annotation {aid} (image {im['id']}, {im['file_name']}) {exc}") from None
            area = a.get("area")
            if area is None:
                area = int(mask_utils.area(rle))
            elif not (isinstance(area, (int, float)) and not isinstance(area, bool)
                      and math.isfinite(area) and area >= 0):
                raise self._fail(f"annotation {aid}: 'area' must be a non-negative number, got {_short(area)}")
            out.append({**a, "iscrowd": int(crowd), "area": area})
        return out

    def _map_by_name(self, file_cats: list[dict], categories: CategoryMap, anns: list[dict]) -> dict[int, int]:
        by_name = dict(zip(categories.names, categories.ids))
        used = {a["category_id"] for a in anns}
        unknown = sorted(c["name"] for c in file_cats if c["name"] not in by_name and c["id"] in used)
        if unknown:
            raise self._fail(f"categories {unknown[:5]} are not among the model's {len(categories)} "
                             f"categories (matched by name: {list(categories.names)[:10]}"
                             f"{', ...' if len(categories) > 10 else ''})")
        return {c["id"]: by_name[c["name"]] for c in file_cats if c["name"] in by_name}

    # -- access

    def annotations_for(self, image_id: int) -> list[dict]:
        """Validated annotations of one image (``category_id`` in `categories`' ids)."""
        return self._anns.get(image_id, [])

    def label_of(self, ann: dict) -> int:
        """Contiguous class index of one of this file's annotations."""
        return self.categories.index_of(ann["category_id"])

    def image_path(self, image: dict) -> Path:
        return self.image_root / image["file_name"]


# --------------------------------------------------------------------------- images


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I;16"):
        # PIL's I;16 -> RGB conversion clips at 255 (a white image); keep the top 8 bits instead.
        arr = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied; DataError if missing or undecodable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, inside the try: PIL decodes lazily
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001 - a broken EXIF block should not make a good photo unusable
                pass
            return _to_rgb(im)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None


# --------------------------------------------------------------------------- transforms


@dataclass
class TransformConfig:
    """Resize (keeping aspect), random flip (training only) and padding for batches."""

    short_side: int = 384
    max_long_side: int = 640
    flip_prob: float = 0.5
    size_divisor: int = 32

    def __post_init__(self) -> None:
        if self.short_side <= 0 or self.max_long_side <= 0:
            raise ConfigError(f"short_side and max_long_side must be positive, got {self.short_side}, "
                              f"{self.max_long_side}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.size_divisor <= 0:
            raise ConfigError(f"size_divisor must be positive, got {self.size_divisor}")


def resized_shape(h: int, w: int, t: TransformConfig) -> tuple[int, int]:
    """(h, w) after the resize: short side -> `short_side` unless the long side would exceed its cap."""
    scale = min(t.short_side / min(h, w), t.max_long_side / max(h, w))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def preprocess_image(img: Image.Image, transform: TransformConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """PIL image -> (float tensor [3, h, w] resized and ImageNet-normalised, (h, w)).

    The one place where model inputs are made, for training, evaluation and inference alike.
    """
    if img.mode != "RGB":
        img = _to_rgb(img)
    h, w = resized_shape(img.height, img.width, transform)
    arr = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std).contiguous(), (h, w)


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


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Binary masks [G, h, w] -> float [G, 4] tight xyxy boxes in pixels (x2, y2 exclusive)."""
    out = torch.zeros(masks.shape[0], 4)
    for i, m in enumerate(masks):
        x, y, w, h = mask_to_bbox(m.numpy())
        out[i] = torch.tensor([x, y, x + w, y + h])
    return out


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


class CocoDataset(torch.utils.data.Dataset):
    """Images and instance targets of a CocoAnnotations, resized for the model.

    Training: random horizontal flip, crowd regions dropped from the targets (K-Net/mmdet
    ignore them; COCOeval handles them at evaluation), images without instances skipped.
    Evaluation (train=False): every image, every annotation (crowd ones flagged in `iscrowd`).
    Instances whose mask vanishes in the resize are dropped.
    """

    def __init__(self, annotations: CocoAnnotations, transform: TransformConfig, train: bool,
                 skip_empty: bool | None = None) -> None:
        self.ann = annotations
        self.transform = transform
        self.train = train
        skip = train if skip_empty is None else skip_empty
        self.images = [im for im in annotations.images
                       if not skip or any(not a["iscrowd"] for a in annotations.annotations_for(im["id"]))]
        if not self.images:
            raise DataError(f"{annotations.ann_file}: no image has a non-crowd annotation to train on")

    def _wanted(self, ann: dict) -> bool:
        return not (self.train and ann["iscrowd"])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        info = self.images[i]
        path = self.ann.image_path(info)
        img = load_image(path)
        H, W = info["height"], info["width"]
        if (img.height, img.width) != (H, W):
            hint = " (after applying its EXIF orientation)" if (img.height, img.width) == (W, H) else ""
            raise DataError(f"{path}: image is {img.height}x{img.width} (HxW){hint} but "
                            f"{self.ann.ann_file.name} says {H}x{W}")
        x, (h, w) = preprocess_image(img, self.transform)
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
        m = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.uint8)
        if self.train and random.random() < self.transform.flip_prob:
            x, m = x.flip(-1), m.flip(-1)
        return Sample(x.contiguous(), m.contiguous(), torch.tensor(labels, dtype=torch.int64), boxes_from_masks(m),
                      int(info["id"]), (H, W), (h, w), info["file_name"], torch.tensor(crowd, dtype=torch.bool))


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

    def to(self, device: torch.device | str) -> Batch:
        moved = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in self.targets]
        return Batch(self.images.to(device), moved)


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
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """DataLoader of `collate`d Batches (ImageBatches for an ImageFolderDataset), shuffled from `seed`.

    Shuffled batches of a dataset with image sizes (CocoDataset) are grouped by
    orientation. Padding follows the dataset's ``transform.size_divisor`` (default 32).
    """
    gen = torch.Generator().manual_seed(seed)
    transform = getattr(dataset, "transform", None)
    divisor = getattr(transform, "size_divisor", 32)
    collate_fn = partial(collate_items if isinstance(dataset, ImageFolderDataset) else collate, size_divisor=divisor)
    images = getattr(dataset, "images", None)
    if shuffle and batch_size > 1 and images is not None:
        landscape = [int(im["width"]) >= int(im["height"]) for im in images]
        return torch.utils.data.DataLoader(dataset, batch_sampler=AspectGroupedBatchSampler(landscape, batch_size, gen),
                                           collate_fn=collate_fn, num_workers=num_workers, generator=gen)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       collate_fn=collate_fn, num_workers=num_workers)
