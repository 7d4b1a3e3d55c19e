"""COCO instance annotations: validated reading and category mapping, and image loading.

Any COCO instances JSON works: polygons, uncompressed and compressed RLE, crowd regions,
any category ids (mapped to contiguous indices 0..C-1 and back). Problems are reported as
DataError naming the file and what to fix, before any training starts.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

from models.data.masks import segmentation_to_rle
from models.errors import DataError

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

    def max_instances(self) -> int:
        """The most non-crowd instances in one image (what a model's kernels must hold; 0 without any)."""
        return max((sum(not a["iscrowd"] for a in self.annotations_for(im["id"])) for im in self.images), default=0)

    def num_instances(self) -> int:
        """The non-crowd instances of all the images (what the labels teach)."""
        return sum(sum(not a["iscrowd"] for a in self.annotations_for(im["id"])) for im in self.images)

    def label_of(self, ann: dict) -> int:
        """Contiguous class index of one of this file's annotations."""
        return self.categories.index_of(ann["category_id"])

    def image_path(self, image: dict) -> Path:
        return self.image_root / image["file_name"]


# --------------------------------------------------------------------------- images


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I;16"):
        # PIL's I;16 -> RGB conversion clips at 255 (a white image); keep the top 8 bits instead.
        arr = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """Bytes of an image file -> RGB PIL image with its EXIF orientation applied; DataError if undecodable.

    The one decoder for training (load_image) and serving (models.pipeline.segment), so a photo
    is seen the same way by both.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode now, inside the try: PIL decodes lazily
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001 - a broken EXIF block should not make a good photo unusable
                pass
            return to_rgb(im)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{name}: cannot decode image ({exc})") from None


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied; DataError if missing or undecodable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    return decode_image(path.read_bytes(), str(path))
