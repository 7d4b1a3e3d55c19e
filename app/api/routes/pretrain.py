"""POST /pretrain: UPLVP pre-training on a zip of unlabeled images for a vocabulary -> a base model version."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile

from app.api.deps import CeleryDep, RegistryDep, SettingsDep
from app.api.forms import ProposalFields, TrainingFields, WebhookField
from app.api.routes.finetune import check_name, queue_job
from app.core.errors import ApiError
from app.core.security import JobAccess
from app.dataset import inspect_images
from app.schemas import ErrorResponse, JobAccepted
from app.uploads import receive_zip, validating
from worker.celery_app import PRETRAIN_TASK

router = APIRouter(tags=["pretrain"])
MAX_VOCABULARY = 1000


def check_vocabulary(vocabulary: str) -> str:
    """`coco` or comma-separated names (each 1-100 characters, no duplicates); returned normalised."""
    if vocabulary.strip().lower() == "coco":
        return "coco"
    names = [n.strip() for n in vocabulary.split(",")]
    problems = [f"name #{i + 1} is empty" for i, n in enumerate(names) if not n]
    problems += [f"{n[:20]!r}... is longer than 100 characters" for n in names if len(n) > 100]
    seen: set[str] = set()
    for n in names:
        if n and n.lower() in seen:
            problems.append(f"{n!r} appears twice")
        seen.add(n.lower())
    if len(names) > MAX_VOCABULARY:
        problems.append(f"{len(names)} names; at most {MAX_VOCABULARY}")
    if problems:
        raise ApiError(400, "invalid_vocabulary", f"vocabulary: {problems[0]}; send 'coco' or names separated by "
                       "commas, e.g. 'cat,dog,car'", problems[:20])
    return ",".join(names)


@router.post("/pretrain", status_code=202, response_model=JobAccepted,
             responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse}},
             summary="Queue UPLVP pre-training on unlabeled images; the result is a base for POST /finetune")
def post_pretrain(
    response: Response,
    registry: RegistryDep,
    settings: SettingsDep,
    celery: CeleryDep,
    principal: JobAccess,
    training: TrainingFields,
    proposal: ProposalFields,
    webhook_url: WebhookField,
    images_zip: Annotated[UploadFile, File(description="zip of unlabeled images (any folders; other files ignored)")],
    vocabulary: Annotated[str, Form(description="category names for the pseudo masks: 'coco' (the 80 COCO "
                                    "names) or comma-separated, e.g. 'bottle,can,jar'. Use the names of the "
                                    "dataset you will fine-tune on and its class head transfers too",
                                    examples=["bottle,can,jar"])],
    name: Annotated[str, Form(description="model name; the pre-trained checkpoint becomes its next version "
                              "(kind 'pretrained')", examples=["shelves-pretrained"])],
) -> JobAccepted:
    """Validate the zip (safety, at least one readable image) and the vocabulary, then queue the job."""
    check_name(name)
    if proposal["proposal_engine"] == "self":
        raise ApiError(400, "self_needs_labels", "proposal_engine=self proposes with a model fine-tuned on labelled "
                       "images, and POST /pretrain has none: use POST /finetune with base=pretrained and "
                       "proposal_engine=self, or another engine here")
    vocab = check_vocabulary(vocabulary)
    job_id = registry.new_job_id()
    work = registry.job_dir(job_id)
    with validating(work, registry):
        got = receive_zip(images_zip, "images_zip", work / "images", settings, job_id, registry)
        n = inspect_images(work / "images", settings.max_image_pixels)
    params = {**training, **proposal, "time_budget_min": 0.0, "vocabulary": vocab, "pretrain": True,
              "pretrain_epochs": training["epochs"]}
    info = {"images_dir": "images", "num_images": n, "sha256": got.sha256, "size_bytes": got.size_bytes,
            "filename": got.filename, **({"uploads": {"images_zip": got.stored}} if got.stored else {})}
    return queue_job(registry, celery, response, job_id, name, "pretrain", PRETRAIN_TASK, params, info, None, principal.id,
                     webhook_url)
