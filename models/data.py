"""COCO instance data: validated reading, resize/flip/normalise transforms, variable-size batching.

Any COCO instances JSON works: polygons, uncompressed and compressed RLE, crowd regions,
any category ids (mapped to contiguous indices 0..C-1 and back). Problems are reported as
DataError naming the file and what to fix, before any training starts.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import DataError
from models.masks import mask_to_bbox, segmentation_to_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CategoryMap:
    """COCO category ids <-> contiguous class indices (sorted by id)."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_coco(cls, categories: list[dict]) -> "CategoryMap":
        cats = sorted(categories, key=lambda c: int(c["id"]))
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c["name"]) for c in cats))

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, cat_id: int) -> int:
        return self._index[int(cat_id)]

    def id_of(self, index: int) -> int:
        return self.ids[index]

    def to_coco(self) -> list[dict]:
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names)]

    @property
    def _index(self) -> dict[int, int]:
        return {c: i for i, c in enumerate(self.ids)}


def _fail(file: Path, msg: str) -> DataError:
    return DataError(f"{file}: {msg}")


def _check_segmentation(file: Path, ann: dict, image: dict) -> None:
    seg = ann.get("segmentation")
    aid = ann.get("id")
    if isinstance(seg, list):
        if not seg:
            raise _fail(file, f"annotation {aid} has an empty polygon list")
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                n = len(poly) // 2 if isinstance(poly, list) else 0
                raise _fail(file, f"annotation {aid} has a polygon with {n} points (need >= 3 x,y pairs)")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly):
                raise _fail(file, f"annotation {aid} has a polygon with non-numeric or non-finite coordinates")
    elif isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise _fail(file, f"annotation {aid}: RLE segmentation needs 'counts' and 'size'")
        if list(seg["size"]) != [image["height"], image["width"]]:
            raise _fail(file, f"annotation {aid}: RLE size {list(seg['size'])} does not match image "
                              f"{image['id']} size [{image['height']}, {image['width']}]")
    else:
        raise _fail(file, f"annotation {aid} has no 'segmentation' (polygons or RLE)")


class CocoAnnotations:
    """A validated COCO instances file plus the folder its images live in.

    `categories` (e.g. a checkpoint's list) maps this file's categories by *name*, so a
    val set or a new train set lines up with the classes a model already knows.
    """

    def __init__(self, ann_file: str | Path, image_root: str | Path, categories: CategoryMap | None = None) -> None:
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        f = self.ann_file
        if not f.is_file():
            raise DataError(f"{f}: annotation file not found")
        if not self.image_root.is_dir():
            raise DataError(f"{self.image_root}: image folder not found")
        try:
            raw = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _fail(f, f"not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise _fail(f, "not a COCO instances file (top level must be an object)")
        for key in ("images", "annotations", "categories"):
            if not isinstance(raw.get(key), list):
                raise _fail(f, f"not a COCO instances file: '{key}' must be a list")
        self.raw: dict[str, Any] = raw

        cat_ids = set()
        for c in raw["categories"]:
            if not isinstance(c, dict) or "id" not in c or "name" not in c:
                raise _fail(f, f"category entry {c!r} needs 'id' and 'name'")
            if c["id"] in cat_ids:
                raise _fail(f, f"category id {c['id']} appears twice")
            cat_ids.add(c["id"])
        own = CategoryMap.from_coco(raw["categories"])
        if categories is None:
            self.categories = own
            self._label = {cid: i for i, cid in enumerate(own.ids)}
        else:
            by_name = {n: i for i, n in enumerate(categories.names)}
            unknown = [n for n in own.names if n not in by_name]
            used = {a.get("category_id") for a in raw["annotations"] if isinstance(a, dict)}
            unknown_used = [n for cid, n in zip(own.ids, own.names) if n in unknown and cid in used]
            if unknown_used:
                raise _fail(f, f"categories {unknown_used[:5]} are not among the model's "
                               f"{len(categories)} categories (matched by name)")
            self.categories = categories
            self._label = {cid: by_name[n] for cid, n in zip(own.ids, own.names) if n in by_name}

        self.images: list[dict] = []
        seen: dict[Any, dict] = {}
        for im in raw["images"]:
            if not isinstance(im, dict) or not all(k in im for k in ("id", "file_name", "height", "width")):
                raise _fail(f, f"image entry {str(im)[:80]} needs 'id', 'file_name', 'height' and 'width'")
            if im["id"] in seen:
                raise _fail(f, f"image id {im['id']} appears twice")
            seen[im["id"]] = im
            self.images.append(im)
        missing = [im["file_name"] for im in self.images if not (self.image_root / im["file_name"]).is_file()]
        if missing:
            raise _fail(f, f"{len(missing)} image file(s) not found under {self.image_root}: {missing[:3]}")

        self._anns: dict[Any, list[dict]] = {im["id"]: [] for im in self.images}
        for a in raw["annotations"]:
            if not isinstance(a, dict):
                raise _fail(f, f"annotation entry {str(a)[:80]} is not an object")
            if a.get("image_id") not in seen:
                raise _fail(f, f"annotation {a.get('id')} points at image id {a.get('image_id')}, "
                               "which is not in 'images'")
            if a.get("category_id") not in cat_ids:
                raise _fail(f, f"annotation {a.get('id')} has category_id {a.get('category_id')}, "
                               "which is not in 'categories'")
            _check_segmentation(f, a, seen[a["image_id"]])
            self._anns[a["image_id"]].append(a)

    def annotations_for(self, image_id: Any) -> list[dict]:
        return self._anns.get(image_id, [])

    def label_of(self, ann: dict) -> int | None:
        """Contiguous class index of an annotation (None: category unknown to the model)."""
        return self._label.get(ann["category_id"])

    def image_path(self, image: dict) -> Path:
        return self.image_root / image["file_name"]


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied; DataError if missing or undecodable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None


@dataclass
class TransformConfig:
    short_side: int = 384
    max_long_side: int = 640
    flip_prob: float = 0.5
    size_divisor: int = 32


def resized_shape(h: int, w: int, t: TransformConfig) -> tuple[int, int]:
    """Keep aspect: scale so the short side is `short_side` unless the long side would exceed its cap."""
    scale = min(t.short_side / min(h, w), t.max_long_side / max(h, w))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def preprocess_image(img: Image.Image, t: TransformConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """PIL RGB -> (normalised float tensor [3,h,w] after resize, (h, w))."""
    h, w = resized_shape(img.height, img.width, t)
    arr = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std, (h, w)


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """[G,h,w] binary -> [G,4] xyxy tight boxes in pixels."""
    out = torch.zeros(masks.shape[0], 4)
    for i, m in enumerate(masks):
        x, y, w, h = mask_to_bbox(m.numpy())
        out[i] = torch.tensor([x, y, x + w, y + h])
    return out


@dataclass
class Sample:
    image: torch.Tensor  # [3,h,w] normalised
    masks: torch.Tensor  # uint8 [G,h,w]
    labels: torch.Tensor  # int64 [G]
    boxes: torch.Tensor  # float [G,4] xyxy
    image_id: Any
    orig_size: tuple[int, int]
    input_size: tuple[int, int]
    file_name: str


class CocoDataset(torch.utils.data.Dataset):
    """Images and instance targets of a CocoAnnotations, resized for the model.

    Training: random horizontal flip, crowd regions dropped from the targets (K-Net/mmdet
    ignore them; COCOeval handles them at evaluation), images with no instances skipped.
    """

    def __init__(self, annotations: CocoAnnotations, transform: TransformConfig, train: bool,
                 skip_empty: bool | None = None) -> None:
        self.ann = annotations
        self.transform = transform
        self.train = train
        skip = train if skip_empty is None else skip_empty
        self.images = [im for im in annotations.images
                       if not skip or any(not a.get("iscrowd", 0) and annotations.label_of(a) is not None
                                          for a in annotations.annotations_for(im["id"]))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        info = self.images[i]
        path = self.ann.image_path(info)
        img = load_image(path)
        H, W = int(info["height"]), int(info["width"])
        if (img.height, img.width) != (H, W):
            raise DataError(f"{path}: image is {img.height}x{img.width} but {self.ann.ann_file.name} "
                            f"says {H}x{W}")
        x, (h, w) = preprocess_image(img, self.transform)
        masks, labels = [], []
        for a in self.ann.annotations_for(info["id"]):
            label = self.ann.label_of(a)
            if label is None or (self.train and a.get("iscrowd", 0)):
                continue
            masks.append(segmentation_to_mask(a["segmentation"], H, W))
            labels.append(label)
        if masks:
            m = torch.from_numpy(np.stack(masks)).float()[None]
            m = (F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0] >= 0.5).to(torch.uint8)
        else:
            m = torch.zeros(0, h, w, dtype=torch.uint8)
        lab = torch.tensor(labels, dtype=torch.int64)
        keep = m.flatten(1).any(1).bool() if len(lab) else torch.zeros(0, dtype=torch.bool)
        m, lab = m[keep], lab[keep]
        if self.train and random.random() < self.transform.flip_prob:
            x, m = x.flip(-1), m.flip(-1)
        return Sample(x, m, lab, boxes_from_masks(m), info["id"], (H, W), (h, w), info["file_name"])


@dataclass
class Batch:
    images: torch.Tensor  # [B,3,Hp,Wp], zero-padded at bottom/right
    targets: list[dict] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "Batch":
        moved = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in self.targets]
        return Batch(self.images.to(device), moved)


def _padded_shape(shapes: list[tuple[int, int]], divisor: int) -> tuple[int, int]:
    hp = max(s[0] for s in shapes)
    wp = max(s[1] for s in shapes)
    return int(math.ceil(hp / divisor) * divisor), int(math.ceil(wp / divisor) * divisor)


def collate_images(images: list[torch.Tensor], size_divisor: int = 32) -> torch.Tensor:
    """[3,h_i,w_i] tensors -> [B,3,Hp,Wp] padded with zeros (= the mean after normalisation)."""
    hp, wp = _padded_shape([tuple(x.shape[-2:]) for x in images], size_divisor)
    out = images[0].new_zeros(len(images), 3, hp, wp)
    for i, x in enumerate(images):
        out[i, :, : x.shape[1], : x.shape[2]] = x
    return out


def collate(samples: list[Sample], size_divisor: int = 32) -> Batch:
    images = collate_images([s.image for s in samples], size_divisor)
    hp, wp = images.shape[-2:]
    targets = []
    for s in samples:
        m = s.masks.new_zeros(s.masks.shape[0], hp, wp)
        m[:, : s.masks.shape[1], : s.masks.shape[2]] = s.masks
        targets.append({"masks": m, "labels": s.labels, "boxes": s.boxes, "image_id": s.image_id,
                        "orig_size": s.orig_size, "input_size": s.input_size, "file_name": s.file_name})
    return Batch(images, targets)


def aspect_grouped_batches(landscape: list[bool], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled batches whose images share an orientation (mmdet's GroupSampler idea).

    A portrait and a landscape image in one batch pad to a square: nearly twice the
    pixels, time and memory for nothing.
    """
    batches: list[list[int]] = []
    for flag in (True, False):
        idx = [i for i, f in enumerate(landscape) if f == flag]
        idx = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
        batches += [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool, seed: int,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches of `collate`d samples; shuffled training batches are grouped by orientation."""
    gen = torch.Generator().manual_seed(seed)
    images = getattr(dataset, "images", None)
    if shuffle and batch_size > 1 and images is not None:
        landscape = [int(im["width"]) >= int(im["height"]) for im in images]
        return torch.utils.data.DataLoader(dataset, batch_sampler=aspect_grouped_batches(landscape, batch_size, gen),
                                           collate_fn=collate, num_workers=num_workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       collate_fn=collate, num_workers=num_workers)
