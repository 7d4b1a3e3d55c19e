"""Torch-free checks of an uploaded COCO dataset zip, done in the API before a job is queued.

1. Zip safety: it is a zip; member count, total uncompressed size and per-member compression
   ratio are capped; absolute names, ``..``, drive letters and symlinks are refused; members are
   streamed out with a byte counter (sizes in headers can lie) into a fresh directory.
2. Layout: one COCO instances JSON (train), or two or three named ``*train*`` / ``*val*`` /
   ``*test*`` (a val split, a test split kept aside); Roboflow's COCO export (``train/ valid/
   test/``, app/roboflow.py); a labelme folder (one JSON per image, app/labelme.py) or an
   Ultralytics YOLO segmentation dataset (``data.yaml``, app/yolo.py), both converted to COCO;
   the image folder is found next to the JSON (itself, ``images/``, ``<stem>/``, the zip root).
3. COCO schema and references: ids, names, image_id / category_id references, a segmentation on
   every annotation, every image file present with a supported extension and a header Pillow
   recognises.

Every problem found (up to a cap) is reported, so a user fixes the zip once. Deep checks
(polygon/RLE decoding, pixel data) are left to the worker's models.data.coco.CocoAnnotations.
"""

from __future__ import annotations

import io
import json
import math
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from app.formats import IMAGE_EXTENSIONS, MAX_PROBLEMS, Problems
from app.labelme import convert_folder, is_labelme
from app.report import dataset_report
from app.roboflow import normalise, roboflow_splits
from app.yolo import find_data_yaml, write_converted, yolo_to_coco

PIL_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "MPO"}
MAX_JSON_BYTES = 512 * 2**20


class DatasetError(Exception):
    """The upload cannot be used; `code` is the API error code, `problems` the list of {file, problem}."""

    def __init__(self, code: str, message: str, problems: list[dict[str, str]] | None = None,
                 status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.problems, self.status = code, message, problems or [], status


@dataclass
class ZipLimits:
    """Caps applied before and while extracting."""

    max_members: int = 20000
    max_total_bytes: int = 4000 * 2**20
    max_ratio: float = 200.0


@dataclass
class DatasetLayout:
    """Where the validated dataset lives (paths relative to the extraction root) and what it holds."""

    train_ann: str
    train_images: str
    val_ann: str | None = None
    val_images: str | None = None
    num_images: int = 0
    num_annotations: int = 0
    categories: list[str] = field(default_factory=list)
    # a test split, kept aside: the finished model is scored on it once (the version's metrics["test"])
    test_ann: str | None = None
    test_images: str | None = None
    format: str = "coco"  # coco | roboflow | labelme | yolo: what the zip held
    notes: list[str] = field(default_factory=list)  # what the upload's normalisation changed
    report: dict[str, Any] = field(default_factory=dict)  # app.report.dataset_report: numbers and warnings

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in the job record)."""
        return dict(self.__dict__)


DEFAULT_MAX_PIXELS = 50_000_000


def image_problem(src: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str | None, tuple[int, int]]:
    """(why the file is not usable, or None; its (width, height) as stored).

    Usable: a format on the allow-list, at most `max_pixels` pixels (checked from the header,
    before any decoding: the decompression-bomb guard), and fully decodable (a truncated or
    corrupt file is caught here, not in the middle of training). JPEGs are decoded at 1/8 scale,
    which still reads every byte of the file.
    """
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            fmt, size = im.format, im.size
            if fmt not in PIL_FORMATS:
                return f"is {fmt}, which is not supported (use JPEG, PNG, BMP, TIFF or WebP)", size
            if size[0] * size[1] > max_pixels:
                return (f"has {size[0]}x{size[1]} pixels, more than the cap of {max_pixels} "
                        "(UPLVP_MAX_IMAGE_PIXELS)"), size
            if fmt in ("JPEG", "MPO"):
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
    except Image.DecompressionBombError as exc:
        return f"is a decompression bomb ({exc})", (0, 0)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        return f"is not a readable image ({exc})", (0, 0)
    return None, size


def _finite(values: Any) -> bool:
    return isinstance(values, list) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def rle_runs(counts: str) -> list[int] | None:
    """The run lengths of a COCO compressed RLE string, or None if it is malformed.

    The format (pycocotools' maskApi.c): each run is a little-endian base-32 number in chars
    48..111, 5 bits per char with bit 0x20 meaning "more", the last char's bit 0x10 its sign;
    from the third run on, the number is a delta to the run two places back.
    """
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                return None
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def annotation_problem(a: dict[str, Any], width: float, height: float) -> str | None:
    """Why an annotation's geometry cannot be right for a width x height image, or None.

    Polygons: each at least 3 points of finite numbers inside the image (tolerance: 2 % of the
    image and 2 px, for annotation tools that overshoot edges). RLE: its size must be the image's.
    bbox: 4 finite numbers, non-negative width/height, inside the image with the same tolerance.
    """
    tol = 0.02 * max(width, height) + 2
    seg = a.get("segmentation")
    if isinstance(seg, list):
        if not seg:
            return "has an empty 'segmentation' list"
        for poly in seg:
            if not _finite(poly) or len(poly) < 6 or len(poly) % 2:
                return "has a polygon that is not a flat list of at least 3 finite (x, y) points"
            xs, ys = poly[0::2], poly[1::2]
            if min(xs) < -tol or min(ys) < -tol or max(xs) > width + tol or max(ys) > height + tol:
                return (f"has a polygon outside the {width:g}x{height:g} image (x {min(xs):g}..{max(xs):g}, "
                        f"y {min(ys):g}..{max(ys):g})")
    elif isinstance(seg, dict):
        size = seg.get("size")
        if "counts" not in seg or not isinstance(seg["counts"], (str, list)):
            return "has an RLE without 'counts'"
        if size != [height, width]:
            return f"has an RLE of size {size}, but its image is [{height:g}, {width:g}] (height, width)"
        counts = seg["counts"]
        if isinstance(counts, list) and (not _finite(counts) or sum(counts) != height * width):
            return f"has an uncompressed RLE whose counts do not add up to height x width ({height:g} x {width:g})"
        if isinstance(counts, str):
            runs = rle_runs(counts)  # pycocotools decodes a corrupt string to garbage instead of failing
            if runs is None or any(r < 0 for r in runs) or sum(runs) != height * width:
                return "has a compressed RLE whose 'counts' string is corrupt (its runs do not cover the image)"
    else:
        return "has a 'segmentation' that is neither polygons nor RLE"
    if "bbox" in a:
        box = a["bbox"]
        if not _finite(box) or len(box) != 4 or box[2] < 0 or box[3] < 0:
            return "has a bbox that is not [x, y, width, height] of finite numbers with width, height >= 0"
        if box[0] < -tol or box[1] < -tol or box[0] + box[2] > width + tol or box[1] + box[3] > height + tol:
            return f"has a bbox {box} outside the {width:g}x{height:g} image"
    if a.get("iscrowd", 0) not in (0, 1):
        return f"has iscrowd {a.get('iscrowd')!r}; it must be 0 or 1"
    return None


def _unsafe_name(name: str) -> str | None:
    if "\x00" in name:
        return "contains a NUL byte"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "contains '..'"
    return None


def safe_extract(zip_path: str | Path, dest: str | Path, limits: ZipLimits, field: str = "dataset") -> list[Path]:
    """Check and extract a zip into `dest` (created; must not exist). Returns the files written.

    `field` names the upload in error messages (the form field the user filled).
    """
    zip_path, dest = Path(zip_path), Path(dest)
    wanted = "a COCO instances JSON and its images" if field == "dataset" else "image files"
    if not zipfile.is_zipfile(zip_path):
        raise DatasetError("not_a_zip", f"the uploaded '{field}' is not a zip file; upload a .zip holding {wanted}")
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError("not_a_zip", f"the uploaded '{field}' is not a readable zip file ({exc})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise DatasetError("zip_too_large", f"the zip has {len(infos)} members; at most {limits.max_members} "
                               "are accepted", status=413)
        total = sum(i.file_size for i in infos)
        if total > limits.max_total_bytes:
            raise DatasetError("zip_too_large", f"the zip unpacks to {total / 2**20:.0f} MB; at most "
                               f"{limits.max_total_bytes / 2**20:.0f} MB are accepted", status=413)
        problems: list[dict[str, str]] = []
        seen: set[str] = set()
        for i in infos:
            why = _unsafe_name(i.filename)
            mode = (i.external_attr >> 16) & 0xFFFF
            norm = i.filename.replace("\\", "/").rstrip("/").lower()
            if why is None and stat.S_ISLNK(mode):
                why = "is a symbolic link"
            if why is None and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                why = "is a device file, FIFO or socket"
            if why is None and norm in seen:
                why = "appears twice (names are compared ignoring case)"
            seen.add(norm)
            if why is None and i.compress_size and i.file_size / max(1, i.compress_size) > limits.max_ratio:
                why = f"has a compression ratio above {limits.max_ratio:.0f} (zip bomb guard)"
            if why:
                problems.append({"file": i.filename, "problem": f"member {why}"})
        if problems:
            raise DatasetError("unsafe_zip", f"the zip has {len(problems)} unsafe member(s), e.g. "
                               f"{problems[0]['file']!r} {problems[0]['problem'][7:]}; rebuild it with relative "
                               "paths and regular files only", problems[:MAX_PROBLEMS])
        dest.mkdir(parents=True, exist_ok=False)
        root = dest.resolve()
        written: list[Path] = []
        budget = limits.max_total_bytes
        for i in infos:
            if i.is_dir():
                continue
            target = (root / i.filename.replace("\\", "/")).resolve()
            if not target.is_relative_to(root):
                raise DatasetError("unsafe_zip", f"zip member {i.filename!r} would land outside the dataset folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(i) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    budget -= len(chunk)
                    if budget < 0:
                        raise DatasetError("zip_too_large", "the zip unpacks to more than "
                                           f"{limits.max_total_bytes / 2**20:.0f} MB", status=413)
                    out.write(chunk)
            written.append(target)
    return written


def _hidden(rel: Path) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.parts)


def _load_json(path: Path) -> tuple[Any, str | None]:
    if path.stat().st_size > MAX_JSON_BYTES:
        return None, f"larger than {MAX_JSON_BYTES // 2**20} MB"
    try:
        return json.loads(path.read_bytes()), None
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"not valid JSON ({exc})"


def _coco_shape_problem(raw: Any) -> str | None:
    if not isinstance(raw, dict):
        return "not a COCO instances file (the top level must be an object)"
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(raw.get(k), list)]
    if missing:
        return f"not a COCO instances file: {', '.join(repr(k) for k in missing)} must be list(s)"
    return None


def _find_image_root(ann: Path, raw: dict, root: Path) -> Path:
    names = [im["file_name"] for im in raw["images"] if isinstance(im, dict) and isinstance(im.get("file_name"), str)]
    candidates = [ann.parent, ann.parent / "images", ann.parent / ann.stem, root, root / "images",
                  ann.parent.parent / "images", ann.parent.parent]
    seen: list[Path] = []
    for c in candidates:
        if c.is_dir() and c.resolve().is_relative_to(root) and c not in seen:
            seen.append(c)
    if not names:
        return seen[0]
    best = max(seen, key=lambda c: sum((c / n).is_file() for n in names[:200]))
    return best


def _check_coco(ann: Path, raw: dict, image_root: Path, root: Path, problems: Problems,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Add the file's schema/reference problems to `problems`; returns the number of annotations."""
    fname = str(ann.relative_to(root))

    def add(code: str, msg: str) -> None:
        problems.add(fname, code, msg)

    cat_ids: set[int] = set()
    cat_names: set[str] = set()
    for c in raw["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            add("invalid_coco", f"category {str(c)[:60]} needs an integer 'id' and a string 'name'")
            continue
        if c["id"] in cat_ids or c["name"] in cat_names:
            add("invalid_coco", f"category {c['id']} / {c['name']!r} appears twice")
        cat_ids.add(c["id"])
        cat_names.add(c["name"])
    if not raw["categories"]:
        add("invalid_coco", "'categories' is empty")
    if not raw["images"]:
        add("invalid_coco", "'images' is empty")
    image_ids: set[int] = set()
    sizes: dict[int, tuple[float, float]] = {}
    for im in raw["images"]:
        if not isinstance(im, dict) or not all(k in im for k in ("id", "file_name", "height", "width")):
            add("invalid_coco", f"image entry {str(im)[:60]} needs 'id', 'file_name', 'height' and 'width'")
            continue
        if not isinstance(im["id"], int) or im["id"] in image_ids:
            add("invalid_coco", f"image id {im['id']!r} is not an integer or appears twice")
            continue
        image_ids.add(im["id"])
        if not _finite([im["width"], im["height"]]) or im["width"] <= 0 or im["height"] <= 0:
            add("invalid_coco", f"image {im['id']}: width and height must be positive numbers")
            continue
        sizes[im["id"]] = (im["width"], im["height"])
        name = im["file_name"]
        if not isinstance(name, str) or not name or _unsafe_name(name):
            add("invalid_coco", f"image {im['id']}: file_name {name!r} must be a relative path")
            continue
        path = image_root / name
        if not path.is_file():
            add("missing_images", f"image {im['id']}: {name} is referenced but not in the zip "
                f"(looked under {image_root.relative_to(root).as_posix() or '.'}/)")
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            add("unsupported_image", f"image {im['id']}: {name} has an unsupported type; use one of "
                + ", ".join(IMAGE_EXTENSIONS))
            continue
        why, (w, h) = image_problem(path, max_pixels)
        if why:
            add("unsupported_image", f"image {im['id']}: {name} {why}")
        elif (w, h) not in ((im["width"], im["height"]), (im["height"], im["width"])):  # EXIF-rotated: swapped
            add("invalid_coco", f"image {im['id']}: {name} is {w}x{h} pixels but 'images' says "
                f"{im['width']}x{im['height']}")
    for pos, a in enumerate(raw["annotations"]):
        if not isinstance(a, dict):
            add("invalid_coco", f"annotation #{pos} is not an object")
            continue
        aid = a.get("id", f"#{pos}")
        if a.get("image_id") not in image_ids:
            add("invalid_coco", f"annotation {aid} points at image id {a.get('image_id')!r}, which is not in 'images'")
        if a.get("category_id") not in cat_ids:
            add("invalid_coco", f"annotation {aid} has category_id {a.get('category_id')!r}, "
                "which is not in 'categories'")
        if "segmentation" not in a:
            add("invalid_coco", f"annotation {aid} has no 'segmentation' (polygons or RLE)")
        elif a.get("image_id") in sizes:
            why = annotation_problem(a, *sizes[a["image_id"]])
            if why:
                add("invalid_coco", f"annotation {aid} {why}")
    if not raw["annotations"]:
        add("invalid_coco", "'annotations' is empty: there is nothing to learn from")
    return len(raw["annotations"])


def _raise(problems: Problems | list[dict[str, str]]) -> None:
    items = problems.items if isinstance(problems, Problems) else problems
    total = problems.count if isinstance(problems, Problems) else len(problems)
    more = f" (and {total - 1} more problem(s), see details)" if total > 1 else ""
    raise DatasetError(items[0]["code"], f"{items[0]['file']}: {items[0]['problem']}{more}", items)


def _discover(root: Path) -> tuple[str, dict[str, tuple[Path, dict]], list[str]]:
    """(format, {"train"[, "val"][, "test"]: (COCO file, its parsed content)}, notes): which files are which split.

    Converted formats (labelme, YOLO) are written as COCO files under `root` first. Every file is parsed
    once, here (they may be hundreds of MB).
    """
    jsons = sorted(p for p in root.rglob("*.json") if p.is_file() and not _hidden(p.relative_to(root)))
    coco: dict[Path, dict] = {}
    labelme: dict[Path, dict] = {}
    rejected: list[dict[str, str]] = []
    for p in jsons:
        raw, err = _load_json(p)
        if err is None and is_labelme(raw):
            labelme[p] = raw
            continue
        err = err or _coco_shape_problem(raw)
        if err:
            rejected.append({"file": str(p.relative_to(root)), "code": "not_coco", "problem": err})
        else:
            coco[p] = raw
    if not coco and not labelme and (found := find_data_yaml(root)) is not None:  # Ultralytics YOLO-seg
        problems, notes = Problems(), ["converted from YOLO segmentation labels to COCO"]
        converted = yolo_to_coco(root, found[0], found[1], problems, notes)
        if problems:
            _raise(problems)
        paths = write_converted(root, converted)
        return "yolo", {split: (paths[split], converted[split]) for split in converted}, notes
    if not jsons:
        raise DatasetError("no_annotations", "the zip has no annotations JSON nor a YOLO data.yaml: add a COCO "
                           "instances file (e.g. annotations.json) next to the images, or upload a Roboflow COCO "
                           "export, labelme files or a YOLO segmentation dataset (data.yaml, images/, labels/)")
    if not coco and labelme:  # a labelme folder: one COCO file made from its per-image files
        converted, found_problems = convert_folder(root, labelme)
        if found_problems:
            raise DatasetError("invalid_labelme", f"{found_problems[0]['file']}: {found_problems[0]['problem']}"
                               + (f" (and {len(found_problems) - 1} more)" if len(found_problems) > 1 else ""),
                               found_problems[:MAX_PROBLEMS])
        return "labelme", {"train": (converted, json.loads(converted.read_bytes()))}, []
    if not coco:
        first = rejected[0]
        raise DatasetError("not_coco", f"{first['file']}: {first['problem']}; the zip needs a COCO instances JSON "
                           "with 'images', 'annotations' and 'categories'", rejected[:MAX_PROBLEMS])
    rel = {p: str(p.relative_to(root)) for p in coco}
    roboflow = roboflow_splits(list(coco))
    if roboflow is not None:
        if "train" not in roboflow:
            raise DatasetError("no_train_split", "this Roboflow export has " + " and ".join(
                f"{rel[p].rsplit('/', 1)[0]}/" for p in roboflow.values()) + " but no train/_annotations.coco.json: "
                "export the train split too (the model learns from it; valid picks the checkpoint, test scores it)")
        dropped = normalise(roboflow, {split: coco[path] for split, path in roboflow.items()})
        notes = ["area recomputed from the masks (Roboflow writes the box's area)"]
        if dropped:
            notes.insert(0, f"dropped the unused category {', '.join(repr(d) for d in dropped)} (Roboflow's dataset "
                         "name, the supercategory of the classes)")
        return "roboflow", {split: (path, coco[path]) for split, path in roboflow.items()}, notes
    if len(coco) == 1:
        return "coco", {"train": next(iter(coco.items()))}, []
    by_split = {split: [p for p in coco if split in p.name.lower()] for split in ("train", "val", "test")}
    if len(coco) > 3 or any(len(v) > 1 for v in by_split.values()) or len(by_split["train"]) != 1 \
            or sum(map(len, by_split.values())) != len(coco):
        names = ", ".join(rel[p] for p in coco)
        raise DatasetError("ambiguous_annotations", f"the zip has {len(coco)} COCO files ({names}); keep one, "
                           "or name them *train*.json and *val*.json (and optionally *test*.json), or upload a "
                           "Roboflow COCO export as it is (train/, valid/, test/)")
    return "coco", {split: (files[0], coco[files[0]]) for split, files in by_split.items() if files}, []


def inspect_dataset(root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> DatasetLayout:
    """Find and check the annotations and images of an extracted dataset (any of the accepted formats)."""
    root = Path(root).resolve()
    fmt, found, notes = _discover(root)
    splits = {split: found[split][0] for split in ("train", "val", "test") if split in found}
    raws = {split: found[split][1] for split in splits}
    problems = Problems()
    image_roots: dict[str, Path] = {}
    counts: dict[str, int] = {}
    for split, path in splits.items():
        image_roots[split] = _find_image_root(path, raws[split], root)
        counts[split] = _check_coco(path, raws[split], image_roots[split], root, problems, max_pixels)
    train_names = [c.get("name") for c in raws["train"]["categories"] if isinstance(c, dict)]
    for split in ("val", "test"):
        if split in raws:
            extra = [c.get("name") for c in raws[split]["categories"]
                     if isinstance(c, dict) and c.get("name") not in train_names]
            if extra:
                problems.add(str(splits[split].relative_to(root)), "invalid_coco",
                             f"has categories that train does not: {extra[:10]}; the model can only "
                             "learn the classes of its training split")
    if problems:
        _raise(problems)

    def where(split: str) -> tuple[str | None, str | None]:
        if split not in splits:
            return None, None
        return str(splits[split].relative_to(root)), str(image_roots[split].relative_to(root))

    (train_ann, train_images), (val_ann, val_images), (test_ann, test_images) = map(where, ("train", "val", "test"))
    assert train_ann is not None and train_images is not None  # _discover always finds a train split
    report = dataset_report({split: (raws[split], image_roots[split]) for split in splits}, root)
    return DatasetLayout(
        train_ann=train_ann, train_images=train_images, val_ann=val_ann, val_images=val_images,
        num_images=len(raws["train"]["images"]), num_annotations=counts["train"], categories=train_names,
        test_ann=test_ann, test_images=test_images, format=fmt, notes=notes, report=report)


def inspect_images(root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Count the readable images under an extracted zip of unlabeled photos (any folder depth).

    DatasetError "no_images" when there is none; "unsupported_image" listing every file (up to
    the cap) that has an image extension but no header Pillow recognises. Other files are ignored.
    """
    root = Path(root).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not _hidden(p.relative_to(root)))
    if not files:
        raise DatasetError("no_images", "the zip holds no images; add JPEG, PNG, BMP, TIFF or WebP files ("
                           + ", ".join(IMAGE_EXTENSIONS) + ")")
    problems: list[dict[str, str]] = []
    for p in files:
        why, _ = image_problem(p, max_pixels)
        if why and len(problems) < MAX_PROBLEMS:
            problems.append({"file": str(p.relative_to(root)), "code": "unsupported_image", "problem": why})
    if problems:
        more = f" (and {len(problems) - 1} more, see details)" if len(problems) > 1 else ""
        raise DatasetError("unsupported_image", f"{problems[0]['file']}: {problems[0]['problem']}{more}", problems)
    return len(files)
