"""Form fields that several job routes share, as dependencies (one definition, one OpenAPI doc)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Depends, Form

from app.api.deps import SettingsDep
from app.core.errors import ApiError
from app.webhooks import WebhookRefused, check_url
from models.config import MIN_TIME_BUDGET_MIN

Engine = Literal["offline", "maskcut", "self", "clip", "grid", "saliency"]


def training_fields(
    epochs: Annotated[int | None, Form(ge=1, le=1000, description="fixed number of epochs; without it (and without "
                                       "time_budget_min) the job trains for the service's default budget")] = None,
    time_budget_min: Annotated[float | None, Form(ge=0, le=1440, description="training minutes (evaluations "
                                                  "included): the schedule is laid out for them; default "
                                                  "UPLVP_DEFAULT_TIME_BUDGET_MIN unless epochs are given; 0 = none")] = None,
    image_size: Annotated[int, Form(ge=0, le=2048, description="short side after resize; 0 = follow the data "
                                    "(the median object ~32 px across, 320..640)")] = 0,
    seed: Annotated[int, Form(ge=0)] = 0,
    batch_size: Annotated[int, Form(ge=0, le=64, description="images per step; 0 = follow the worker's device "
                                    "(2 on a CPU, 8 on a GPU, 16 from 40 GB)")] = 0,
    lr: Annotated[float, Form(gt=0, le=1)] = 4e-4,
    warmup_iters: Annotated[int, Form(ge=0)] = 50,
    width: Annotated[int, Form(ge=32, le=512, multiple_of=32, description="advanced: neck/kernel channels")] = 128,
    kernels: Annotated[int, Form(ge=0, le=2000, description="advanced: dynamic kernels N (0: follow the data, at "
                                 "least 50 and more than the most instances in one image)")] = 0,
    stages: Annotated[int, Form(ge=1, le=6, description="advanced: kernel-update stages")] = 3,
    backbone: Annotated[Literal["imagenet", "none"], Form(description="advanced: 'none' = random init (tests)")] = "imagenet",
) -> dict[str, Any]:
    """The schedule and model shape of a training job, as models.pipeline.FinetuneParams fields
    (`time_budget_min` None = not given: the route decides from the settings; max_size 0: the engine
    derives the long side from the short one, models.pipeline.long_side_for)."""
    if 0 < image_size < 32:
        raise ApiError(400, "image_size_invalid", f"image_size={image_size} is too small: use at least 32, or 0 to "
                       "follow the data")
    return {"epochs": epochs or 0, "time_budget_min": time_budget_min, "image_size": image_size,
            "max_size": 0, "seed": seed, "batch_size": batch_size, "lr": lr,
            "warmup_iters": warmup_iters, "width": width, "kernels": kernels, "stages": stages,
            "backbone_weights": backbone}


def resolve_budget(training: dict[str, Any], default_min: float) -> dict[str, Any]:
    """Fill in the time budget: given, else none when epochs are given, else the default; a
    budget too small for a few steps and one evaluation is refused with the minimum named."""
    budget = training["time_budget_min"]
    if budget is None:
        budget = 0.0 if training["epochs"] else default_min
    if 0 < budget < MIN_TIME_BUDGET_MIN:
        raise ApiError(400, "time_budget_too_small", f"time_budget_min={budget:g} is too short to train a few "
                       f"steps and evaluate once: the minimum is {MIN_TIME_BUDGET_MIN:g} minute(s), or 0 with epochs")
    return {**training, "time_budget_min": float(budget)}


def proposal_fields(
    proposal_engine: Annotated[Engine, Form(description="Masks Proposal engine: offline, maskcut (offline + "
                                            "normalized cuts + grouped segments), self (POST /finetune only: a teacher fine-tuned "
                                            "on the labels proposes), clip (needs UPLVP_CLIP_PRETRAINED on the "
                                            "worker), grid or saliency")] = "offline",
    max_masks: Annotated[int, Form(ge=1, le=100, description="pseudo masks per image at most")] = 10,
) -> dict[str, Any]:
    """How UPLVP proposes pseudo masks."""
    return {"proposal_engine": proposal_engine, "max_masks": max_masks}


def webhook_field(
    settings: SettingsDep,
    webhook_url: Annotated[str | None, Form(description="called with a POST when the job succeeds, fails or is "
                                            "cancelled: {event, job}, signed with HMAC-SHA256 (header "
                                            "X-Uplvp-Signature: sha256=<hex>); http(s), public addresses only")] = None,
) -> str | None:
    """A job's webhook URL, checked now (scheme, SSRF rules) so that a bad one is a 400, not a silent miss."""
    if not webhook_url:
        return None
    if not settings.webhook_secret.get_secret_value():
        raise ApiError(400, "webhooks_disabled", "this server signs webhooks with UPLVP_WEBHOOK_SECRET, which is not "
                       "set: ask its operator to set it, or poll GET /jobs/{id}")
    try:
        return check_url(webhook_url.strip(), settings.webhook_allow_private)
    except WebhookRefused as exc:
        raise ApiError(400, "webhook_url_refused", str(exc)) from None


TrainingFields = Annotated[dict[str, Any], Depends(training_fields)]
WebhookField = Annotated[str | None, Depends(webhook_field)]
ProposalFields = Annotated[dict[str, Any], Depends(proposal_fields)]
