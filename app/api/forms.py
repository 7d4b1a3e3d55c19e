"""Form fields that several job routes share, as dependencies (one definition, one OpenAPI doc)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Depends, Form

Engine = Literal["offline", "clip", "grid", "saliency"]


def training_fields(
    epochs: Annotated[int, Form(ge=1, le=1000)] = 12,
    image_size: Annotated[int, Form(ge=32, le=2048, description="short side after resize")] = 384,
    seed: Annotated[int, Form(ge=0)] = 0,
    batch_size: Annotated[int, Form(ge=1, le=64)] = 2,
    lr: Annotated[float, Form(gt=0, le=1)] = 1e-4,
    warmup_iters: Annotated[int, Form(ge=0)] = 100,
    width: Annotated[int, Form(ge=32, le=512, multiple_of=32, description="advanced: neck/kernel channels")] = 128,
    kernels: Annotated[int, Form(ge=1, le=300, description="advanced: dynamic kernels N")] = 50,
    stages: Annotated[int, Form(ge=1, le=6, description="advanced: kernel-update stages")] = 3,
    backbone: Annotated[Literal["imagenet", "none"], Form(description="advanced: 'none' = random init (tests)")] = "imagenet",
) -> dict[str, Any]:
    """The schedule and model shape of a training job, as models.pipeline.FinetuneParams fields."""
    return {"epochs": epochs, "image_size": image_size, "max_size": max(image_size, round(image_size * 5 / 3)),
            "seed": seed, "batch_size": batch_size, "lr": lr, "warmup_iters": warmup_iters, "width": width,
            "kernels": kernels, "stages": stages, "backbone_weights": backbone}


def proposal_fields(
    proposal_engine: Annotated[Engine, Form(description="Masks Proposal engine (clip needs UPLVP_CLIP_PRETRAINED "
                                            "on the worker)")] = "offline",
    max_masks: Annotated[int, Form(ge=1, le=100, description="pseudo masks per image at most")] = 10,
) -> dict[str, Any]:
    """How UPLVP proposes pseudo masks."""
    return {"proposal_engine": proposal_engine, "max_masks": max_masks}


TrainingFields = Annotated[dict[str, Any], Depends(training_fields)]
ProposalFields = Annotated[dict[str, Any], Depends(proposal_fields)]
