"""POST /finetune: upload a COCO zip (and optionally unlabeled images), validate, queue a job (202 + Location)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from celery import Celery
from fastapi import APIRouter, File, Form, Response, UploadFile

from app.api.deps import CeleryDep, RegistryDep, SettingsDep
from app.api.enqueue import enqueue
from app.api.forms import ProposalFields, TrainingFields, WebhookField, resolve_budget
from app.core.errors import ApiError
from app.core.security import JobAccess
from app.dataset import inspect_dataset, inspect_images
from app.registry import NotFound, Registry
from app.schemas import ErrorResponse, JobAccepted
from app.uploads import receive_zip, validating
from worker.celery_app import FINETUNE_TASK

router = APIRouter(tags=["finetune"])

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    """A model name: letters, digits, '_', '.', '-' (max 64), starting with a letter or digit."""
    if not NAME_RE.match(name):
        raise ApiError(400, "invalid_name", f"model name {name!r} is not valid: use 1-64 letters, digits, '_', '.' "
                       "or '-', starting with a letter or digit")
    return name


def resolve_base(registry: Registry, name: str, base: str) -> str | None:
    """`base` -> "name:version" of an existing model version, or None (no base version).

    Accepted: "" / "none" (ImageNet backbone only), "pretrained" (UPLVP pre-training on the zip's
    images first; no base version), "<model>:<version>", "<model>" (its production version, else
    latest), "<version>" (a version of the model being trained). A `pretrained` version made by
    POST /pretrain is used like any other.
    """
    base = base.strip()
    if base in ("", "none", "pretrained"):
        return None
    if base.isdigit():
        model, version = name, int(base)
    elif ":" in base:
        model, _, v = base.rpartition(":")
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
    return f"{rec['name']}:{rec['version']}"


def queue_job(registry: Registry, celery: Celery, response: Response, job_id: str, name: str, kind: str,
              task: str, params: dict[str, Any], info: dict[str, Any], base: str | None, owner: str,
              webhook_url: str | None = None) -> JobAccepted:
    """Record the job, send its task to the `train` queue, answer 202 with Location (also POST /pretrain)."""
    registry.create_job(job_id, name, params, info, base, kind=kind, owner=owner, webhook_url=webhook_url)
    location = enqueue(registry, celery, job_id, task, [job_id], "train")
    response.headers["Location"] = location
    response.headers["Retry-After"] = "5"
    return JobAccepted(id=job_id, state="queued", location=location, report=info.get("report"))


@router.post("/finetune", status_code=202, response_model=JobAccepted,
             responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}},
             summary="Queue a fine-tuning job on a COCO dataset zip")
def post_finetune(
    response: Response,
    registry: RegistryDep,
    settings: SettingsDep,
    celery: CeleryDep,
    principal: JobAccess,
    training: TrainingFields,
    proposal: ProposalFields,
    webhook_url: WebhookField,
    dataset: Annotated[UploadFile, File(description="zip: a COCO instances JSON and its images (*train*.json "
                                        "with *val*.json and/or *test*.json: those splits), a Roboflow COCO export "
                                        "(train/ valid/ test/), labelme files, or a YOLO segmentation dataset "
                                        "(data.yaml, images/, labels/)")],
    name: Annotated[str, Form(description="model name; the result is its next version", examples=["shelves"])],
    base: Annotated[str, Form(description="start from: 'none' (ImageNet backbone), '<model>:<version>', "
                              "'<model>' (its production, else latest; e.g. a POST /pretrain result), or "
                              "'pretrained' (UPLVP: propose pseudo masks on the zip's images and on `unlabeled`, "
                              "pre-train on them, then fine-tune)")] = "none",
    unlabeled: Annotated[UploadFile | None, File(description="base=pretrained only: a zip of extra unlabeled "
                                                 "images for the pre-training")] = None,
    val_fraction: Annotated[float, Form(ge=0.0, lt=1.0, description="held-out share when the zip has no val split")] = 0.2,
    pretrain_epochs: Annotated[int, Form(ge=0, le=1000, description="base=pretrained: pre-training epochs "
                                         "(0: as many as `epochs`)")] = 0,
) -> JobAccepted:
    """Validate the upload now (zip safety, COCO schema, image files), then queue the job on `train`."""
    check_name(name)
    pretrain = base.strip() == "pretrained"
    if unlabeled is not None and not pretrain:
        raise ApiError(400, "unlabeled_needs_pretrained", "'unlabeled' images are used by UPLVP pre-training only: "
                       "send base=pretrained with them, or leave them out")
    base_ref = resolve_base(registry, name, base)
    job_id = registry.new_job_id()
    work = registry.job_dir(job_id)
    with validating(work, registry):
        got = receive_zip(dataset, "dataset", work / "dataset", settings, job_id, registry)
        layout = inspect_dataset(work / "dataset", settings.max_image_pixels)
        if pretrain and proposal["proposal_engine"] == "self" and layout.val_ann is None \
                and (val_fraction == 0 or layout.num_images < 2):
            raise ApiError(400, "self_needs_validation", "proposal_engine=self fine-tunes a teacher on the labels "
                           "first and needs held-out images to pick its checkpoint: this dataset has no val split "
                           f"and val_fraction={val_fraction:g} holds none of its {layout.num_images} image(s) out; "
                           "add a val split or images, set val_fraction > 0, or choose another proposal_engine")
        info = {**layout.to_dict(), "sha256": got.sha256, "size_bytes": got.size_bytes, "filename": got.filename}
        uploads = {"dataset": got.stored}
        if unlabeled is not None:
            extra = receive_zip(unlabeled, "unlabeled", work / "unlabeled", settings, job_id, registry)
            info.update(unlabeled_dir="unlabeled", unlabeled_images=inspect_images(work / "unlabeled", settings.max_image_pixels),
                        unlabeled_sha256=extra.sha256)
            uploads["unlabeled"] = extra.stored
        if registry.remote_store:  # where a worker on another host finds them (worker.tasks.job_files)
            info["uploads"] = uploads
    params = {**resolve_budget(training, settings.default_time_budget_min), **proposal, "val_fraction": val_fraction,
              "pretrain": pretrain,
              "pretrain_epochs": pretrain_epochs}
    return queue_job(registry, celery, response, job_id, name, "finetune", FINETUNE_TASK, params, info, base_ref,
                     principal.id, webhook_url)
