"""POST /finetune: upload a COCO zip, validate it, queue a fine-tuning job (202 + Location)."""

from __future__ import annotations

import hashlib
import re
import shutil
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Response, UploadFile

from app.api.deps import CeleryDep, RegistryDep, SettingsDep
from app.core.errors import ApiError
from app.dataset import DatasetError, ZipLimits, inspect_dataset, safe_extract
from app.registry import NotFound, Registry
from app.schemas import ErrorResponse, JobAccepted
from worker.celery_app import FINETUNE_TASK

router = APIRouter(tags=["finetune"])

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    """A model name: letters, digits, '_', '.', '-' (max 64), starting with a letter or digit."""
    if not NAME_RE.match(name):
        raise ApiError(400, "invalid_name", f"model name {name!r} is not valid: use 1-64 letters, digits, '_', '.' "
                       "or '-', starting with a letter or digit")
    return name


def resolve_base(registry: Registry, name: str, base: str) -> tuple[str | None, str | None]:
    """`base` -> (name:version, artifact path relative to the data dir), or (None, None) for none.

    Accepted: "" / "none" (ImageNet backbone only), "pretrained" (UPLVP pre-training on the zip's
    images first; no base version), "<model>:<version>", "<model>" (its production version, else
    latest), "<version>" (a version of the model being trained).
    """
    base = base.strip()
    if base in ("", "none"):
        return None, None
    if base == "pretrained":
        return None, None  # the job pre-trains on the zip's images first (params["pretrain"])
    if base.isdigit():
        model, version = name, int(base)
    elif ":" in base:
        model, _, v = base.partition(":")
        if not v.isdigit():
            raise ApiError(400, "invalid_base", f"base {base!r}: the version after ':' must be an integer")
        version = int(v)
    else:
        model, version = base, None
    try:
        rec = registry.resolve(model, version)
    except NotFound as exc:
        raise ApiError(404, "unknown_model" if "version" not in str(exc) else "unknown_version",
                       f"base {base!r}: {exc.args[0]}; see GET /models") from None
    return f"{rec['name']}:{rec['version']}", rec["artifact"]


@router.post("/finetune", status_code=202, response_model=JobAccepted,
             responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}},
             summary="Queue a fine-tuning job on a COCO dataset zip")
def post_finetune(
    response: Response,
    registry: RegistryDep,
    settings: SettingsDep,
    celery: CeleryDep,
    dataset: Annotated[UploadFile, File(description="zip: a COCO instances JSON and its images; a second JSON "
                                        "named *val*.json (with *train*.json) is used as the val split")],
    name: Annotated[str, Form(description="model name; the result is its next version", examples=["shelves"])],
    base: Annotated[str, Form(description="start from: 'none' (ImageNet backbone), '<model>:<version>', "
                              "'<model>' (its production, else latest), or 'pretrained' (UPLVP: propose pseudo masks on "
                              "the zip's images, pre-train on them, then fine-tune)")] = "none",
    epochs: Annotated[int, Form(ge=1, le=1000)] = 12,
    image_size: Annotated[int, Form(ge=32, le=2048, description="short side after resize")] = 384,
    val_fraction: Annotated[float, Form(ge=0.0, lt=1.0, description="held-out share when the zip has no val split")] = 0.2,
    seed: Annotated[int, Form(ge=0)] = 0,
    batch_size: Annotated[int, Form(ge=1, le=64)] = 2,
    lr: Annotated[float, Form(gt=0, le=1)] = 1e-4,
    warmup_iters: Annotated[int, Form(ge=0)] = 100,
    width: Annotated[int, Form(ge=32, le=512, multiple_of=32, description="advanced: neck/kernel channels")] = 128,
    kernels: Annotated[int, Form(ge=1, le=300, description="advanced: dynamic kernels N")] = 50,
    stages: Annotated[int, Form(ge=1, le=6, description="advanced: kernel-update stages")] = 3,
    backbone: Annotated[Literal["imagenet", "none"], Form(description="advanced: 'none' = random init (tests)")] = "imagenet",
    pretrain_epochs: Annotated[int, Form(ge=0, le=1000, description="base=pretrained: pre-training epochs "
                                         "(0: as many as `epochs`)")] = 0,
    proposal_engine: Annotated[Literal["offline", "clip", "grid", "saliency"],
                               Form(description="base=pretrained: Masks Proposal engine (clip needs "
                                    "UPLVP_CLIP_PRETRAINED on the worker)")] = "offline",
    max_masks: Annotated[int, Form(ge=1, le=100, description="base=pretrained: pseudo masks per image")] = 10,
) -> JobAccepted:
    """Validate the upload now (zip safety, COCO schema, image files), then queue the job on `train`."""
    check_name(name)
    base_ref, init_artifact = resolve_base(registry, name, base)
    job_id = registry.new_job_id()
    uploads = settings.data_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    zip_path = uploads / f"{job_id}.zip"
    work = registry.job_dir(job_id)
    cap = int(settings.max_upload_mb * 2**20)
    digest, size = hashlib.sha256(), 0
    try:
        with open(zip_path, "wb") as out:
            while chunk := dataset.file.read(1 << 20):
                size += len(chunk)
                if size > cap:
                    raise ApiError(413, "upload_too_large", f"the dataset zip is larger than UPLVP_MAX_UPLOAD_MB "
                                   f"({settings.max_upload_mb:g} MB)")
                digest.update(chunk)
                out.write(chunk)
        limits = ZipLimits(settings.max_zip_members, int(settings.max_unzipped_mb * 2**20),
                           settings.max_compression_ratio)
        safe_extract(zip_path, work / "dataset", limits)
        layout = inspect_dataset(work / "dataset")
    except DatasetError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise ApiError(exc.status, exc.code, exc.message, exc.problems) from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        zip_path.unlink(missing_ok=True)
    params = {"epochs": epochs, "image_size": image_size, "max_size": max(image_size, round(image_size * 5 / 3)),
              "val_fraction": val_fraction, "seed": seed, "batch_size": batch_size, "lr": lr,
              "warmup_iters": warmup_iters, "width": width, "kernels": kernels, "stages": stages,
              "backbone_weights": backbone, "init_artifact": init_artifact,
              "pretrain": base.strip() == "pretrained", "pretrain_epochs": pretrain_epochs,
              "proposal_engine": proposal_engine, "max_masks": max_masks}
    info = {**layout.to_dict(), "sha256": digest.hexdigest(), "size_bytes": size,
            "filename": dataset.filename}
    registry.create_job(job_id, name, params, info, base_ref)
    try:
        celery.send_task(FINETUNE_TASK, args=[job_id], task_id=job_id, queue="train")
    except Exception as exc:  # noqa: BLE001 - broker unreachable
        registry.finish_job(job_id, "failed", error={"code": "queue_unavailable", "message": str(exc)})
        raise ApiError(503, "queue_unavailable", f"could not queue the job: {exc}") from None
    location = f"/jobs/{job_id}"
    response.headers["Location"] = location
    response.headers["Retry-After"] = "5"
    return JobAccepted(id=job_id, state="queued", location=location)
