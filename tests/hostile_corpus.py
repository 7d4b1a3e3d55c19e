"""Hostile uploads, built on the fly (nothing binary is committed): each is (name, field, bytes, code).

Used by tests/app/test_hostile.py (every one must be refused with a 4xx and leave nothing behind)
and by bench/reliability.py (which reports them).
"""

from __future__ import annotations

import io
import json
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path


def _zip(members: list[tuple[zipfile.ZipInfo | str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return buf.getvalue()


def _special(name: str, mode: int, data: bytes = b"") -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (mode & 0xFFFF) << 16
    info.create_system = 3  # unix
    return info, data


def png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A valid small PNG whose header claims width x height pixels (1.6 gigapixels by default)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def build(dataset_dir: Path) -> list[tuple[str, str, bytes, str]]:
    """The corpus for a valid COCO dataset folder (annotations.json + images/): name, form field,
    upload bytes and the error code the API must answer with."""
    coco = json.loads((dataset_dir / "annotations.json").read_text())
    images = {p.relative_to(dataset_dir).as_posix(): p.read_bytes() for p in (dataset_dir / "images").iterdir()}
    files = [(n, d) for n, d in images.items()]

    def with_coco(mutate: Callable[[dict], None], extra: list[tuple[str, bytes]] | None = None) -> bytes:
        c = json.loads(json.dumps(coco))
        mutate(c)
        return _zip([("annotations.json", json.dumps(c).encode()), *files, *(extra or [])])

    first = files[0][0]
    jpeg = images[first]
    corpus = [
        ("zip bomb (one member, ratio ~1000)", "dataset", _zip([("annotations.json", json.dumps(coco).encode()),
                                                                ("images/bomb.bin", b"\0" * (64 << 20))]),
         "unsafe_zip"),
        ("nested zip (never opened)", "dataset", _zip([("inner.zip", _zip([("annotations.json", b"{}"), *files]))],
                                                      zipfile.ZIP_STORED), "no_annotations"),
        ("path traversal ../", "dataset", _zip([("annotations.json", b"{}"), ("../../evil.txt", b"x")]), "unsafe_zip"),
        ("absolute path", "dataset", _zip([("annotations.json", b"{}"), ("/tmp/evil.txt", b"x")]), "unsafe_zip"),
        ("symlink member", "dataset", _zip([("annotations.json", b"{}"), _special("images/link", stat.S_IFLNK | 0o777,
                                                                                   b"/etc/passwd")]), "unsafe_zip"),
        ("device file member", "dataset", _zip([("annotations.json", b"{}"),
                                                _special("images/dev", stat.S_IFCHR | 0o666)]), "unsafe_zip"),
        ("duplicate member names", "dataset", _zip([("annotations.json", b"{}"), ("images/a.jpg", jpeg),
                                                    ("images/A.jpg", jpeg)]), "unsafe_zip"),
        ("50,000-member zip", "dataset", _zip([(f"f/{i}.txt", b"") for i in range(50_000)], zipfile.ZIP_STORED),
         "zip_too_large"),
        ("PNG decompression bomb (40000 x 40000 header)", "dataset",
         with_coco(lambda c: c["images"][0].update(file_name="bomb.png", width=40_000, height=40_000),
                   [("images/bomb.png", png_bomb())]), "unsupported_image"),
        ("truncated JPEG", "dataset", _zip([("annotations.json", json.dumps(coco).encode()),
                                            *[(n, d[: len(d) // 2] if n == first else d) for n, d in files]]),
         "unsupported_image"),
        ("not a zip", "dataset", b"PK\x03\x04 but not really a zip", "not_a_zip"),
        ("COCO: duplicate category ids", "dataset",
         with_coco(lambda c: c["categories"].append(dict(c["categories"][0]))), "invalid_coco"),
        ("COCO: annotation on an unknown image", "dataset",
         with_coco(lambda c: c["annotations"][0].update(image_id=987654)), "invalid_coco"),
        ("COCO: unknown category", "dataset", with_coco(lambda c: c["annotations"][0].update(category_id=987654)),
         "invalid_coco"),
        ("COCO: image listed twice", "dataset", with_coco(lambda c: c["images"].append(dict(c["images"][0]))),
         "invalid_coco"),
        ("COCO: 2-point polygon", "dataset",
         with_coco(lambda c: c["annotations"][0].update(segmentation=[[1, 1, 5, 5]])), "invalid_coco"),
        ("COCO: NaN / infinite coordinates", "dataset",
         with_coco(lambda c: c["annotations"][0].update(segmentation=[[1, 1, 5, 5, 1e999, 3]])), "invalid_coco"),
        ("COCO: polygon far outside the image", "dataset",
         with_coco(lambda c: c["annotations"][0].update(segmentation=[[1, 1, 90000, 5, 3, 8]])), "invalid_coco"),
        ("COCO: RLE of the wrong size", "dataset",
         with_coco(lambda c: c["annotations"][0].update(segmentation={"size": [10, 10], "counts": "PQ0"})),
         "invalid_coco"),
        ("COCO: corrupt RLE string", "dataset",
         with_coco(lambda c: c["annotations"][0].update(segmentation={"size": [c["images"][0]["height"],
                                                                              c["images"][0]["width"]],
                                                                     "counts": "zzzz"})), "invalid_coco"),
        ("COCO: negative bbox", "dataset", with_coco(lambda c: c["annotations"][0].update(bbox=[0, 0, -5, 3])),
         "invalid_coco"),
        ("COCO: wrong image size", "dataset", with_coco(lambda c: c["images"][0].update(width=123, height=45)),
         "invalid_coco"),
        ("COCO: file_name escaping the zip", "dataset",
         with_coco(lambda c: c["images"][0].update(file_name="../../etc/passwd")), "invalid_coco"),
        ("COCO: not COCO at all", "dataset", _zip([("annotations.json", b"[1, 2, 3]"), *files]), "not_coco"),
        ("COCO: not JSON", "dataset", _zip([("annotations.json", b"{oops"), *files]), "not_coco"),
    ]
    return corpus
