"""Receiving uploaded zips: stream to disk under the size cap while hashing, then extract safely.

Shared by POST /finetune (the dataset and the optional unlabeled zip) and POST /pretrain.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import UploadFile

from app.core.config import Settings
from app.core.errors import ApiError
from app.dataset import DatasetError, ZipLimits, safe_extract
from app.registry import Registry


@dataclass
class Received:
    """An upload that was stored and extracted: its digest, size and original file name, and where the zip is
    kept for workers on other hosts (a remote store: {key, sha256, size_bytes, dir}; else None)."""

    sha256: str
    size_bytes: int
    filename: str | None
    stored: dict[str, Any] | None = None


def receive_zip(upload: UploadFile, field: str, dest: Path, settings: Settings, job_id: str,
                registry: Registry | None = None) -> Received:
    """Stream `upload` to a temp file (413 past UPLVP_MAX_UPLOAD_MB), then extract it into `dest`.

    With a registry whose store is remote (S3), the zip is also put into the store (jobs/<id>/<field>.zip)
    once it extracted safely: a worker on another host extracts it from there. Raises DatasetError (bad or
    unsafe zip; its message names the form field) for `validating` to turn into the API's answer; the temp
    file is always removed. `dest` must not exist yet.
    """
    uploads = settings.data_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    zip_path = uploads / f"{job_id}.{field}.zip"
    cap = int(settings.max_upload_mb * 2**20)
    digest, size = hashlib.sha256(), 0
    try:
        with open(zip_path, "wb") as out:
            while chunk := upload.file.read(1 << 20):
                size += len(chunk)
                if size > cap:
                    raise ApiError(413, "upload_too_large", f"'{field}' is larger than UPLVP_MAX_UPLOAD_MB "
                                   f"({settings.max_upload_mb:g} MB)")
                digest.update(chunk)
                out.write(chunk)
        limits = ZipLimits(settings.max_zip_members, int(settings.max_unzipped_mb * 2**20),
                           settings.max_compression_ratio)
        safe_extract(zip_path, dest, limits, field=field)
        stored = None
        if registry is not None and registry.remote_store:
            stored = {**registry.put_job_file(job_id, zip_path, f"{field}.zip"), "dir": dest.name}
    finally:
        zip_path.unlink(missing_ok=True)
    return Received(sha256=digest.hexdigest(), size_bytes=size, filename=upload.filename, stored=stored)


UPLOAD_FIELDS = ("dataset", "unlabeled", "images_zip")  # the zip fields of POST /finetune and POST /pretrain


@contextmanager
def validating(work: Path, registry: Registry | None = None) -> Iterator[Path]:
    """Around receiving and checking a job's uploads: on any failure the job's folder is removed (and the zips
    already put into a remote store: the folder is named after the job id), and a DatasetError becomes the
    ApiError that tells the user what to fix."""
    try:
        yield work
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if registry is not None and registry.remote_store:
            for field in UPLOAD_FIELDS:
                try:
                    registry.store.delete(registry.job_key(work.name, f"{field}.zip"))
                except OSError:
                    pass  # the store is down: the answer is the upload's problem, not this
        if isinstance(exc, DatasetError):
            raise ApiError(exc.status, exc.code, exc.message, exc.problems) from None
        raise
