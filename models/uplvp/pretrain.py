"""UPLVP pre-training (method.md §3, §4, §6): kernels learn from pseudo masks, with prompts.

Unlabeled images + the pseudo-mask COCO JSON that `uplvp propose` writes. Each step:
the pseudo masks become prompts (models.uplvp.prompts) added to the matched initial kernels, and
the kernels are supervised against the same pseudo masks and pseudo categories with the
engine's Hungarian assignment and set criterion (kernel supervision). The backbone is frozen
by default (the reference freezes it); the checkpoint loads into `uplvp finetune --init`.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from models.config import ModelConfig, TrainConfig
from models.data.coco import CocoAnnotations
from models.data.dataset import CocoDataset
from models.data.transforms import TransformConfig
from models.engine.train import TrainHooks, TrainState, train
from models.errors import ConfigError, DataError, NoPseudoMasksError
from models.uplvp.prompts import PromptConfig, Prompter


def load_pseudo(pseudo_json: str | Path, images: str | Path, transform: TransformConfig) -> tuple[CocoDataset, dict]:
    """The pre-training set: images of `pseudo_json` found under `images` that have pseudo masks.

    Images missing from the folder are skipped with a warning (an error when none is left);
    a file with no pseudo mask at all is an error, never a silent pre-training on nothing.
    Returns (dataset, summary).
    """
    try:
        ann = CocoAnnotations(pseudo_json, images, skip_missing=True)
    except DataError as exc:
        if "image files not found" in str(exc):  # all of them: the wrong folder
            raise DataError(f"{pseudo_json}: none of its images is under {images}; pass the folder the pseudo "
                            "masks were proposed for") from None
        raise
    missing = ann.missing
    if missing:
        warnings.warn(f"{len(missing)} images of {pseudo_json} are not under {images} and are skipped "
                      f"(e.g. {', '.join(missing[:3])})", stacklevel=2)
    n_masks = sum(len(ann.annotations_for(im["id"])) for im in ann.images)
    if n_masks == 0:
        raise NoPseudoMasksError(f"{pseudo_json}: no pseudo masks at all ({len(ann.images)} images): nothing to "
                                 "pre-train on; check the vocabulary and the engine (`uplvp propose`), or use more "
                                 "images")
    ds = CocoDataset(ann, transform, train=True)  # keeps images with at least one pseudo mask
    without_masks = len(ann.images) - len(ds.images)
    summary = {"images": len(ds.images), "pseudo_masks": n_masks, "missing_images": len(missing),
               "images_without_masks": without_masks, "categories": [c["name"] for c in ann.categories.to_coco()]}
    return ds, summary


def pretrain(
    model: nn.Module,
    dataset: CocoDataset,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    prompt_cfg: PromptConfig,
    categories: list[dict],
    out: str | Path | None = None,
    train_backbone: bool = False,
    hooks: TrainHooks | None = None,
    resume: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> TrainState:
    """Pre-train a K-Net on pseudo masks with prompt-kernel matching; checkpoints go to `out`.

    `prompt_cfg.matching == "none"` pre-trains on the pseudo masks alone (the ablation that
    isolates the prompts' effect). The backbone is frozen unless `train_backbone` (then it
    trains at lr x cfg.backbone_lr_mult).
    """
    if model_cfg.arch != "knet":
        raise ConfigError(f"UPLVP pre-training is for K-Net (its kernels take the prompts), not {model_cfg.arch!r}")
    prompt_cfg.validate(model_cfg.num_kernels)
    if not train_backbone:
        model.backbone.set_frozen(5)
        model_cfg = dataclasses.replace(model_cfg, frozen_backbone_stages=5)

    def step(m: nn.Module, batch: Any) -> dict:
        prompter = None if prompt_cfg.matching == "none" else Prompter(prompt_cfg, batch.targets, training=True)
        return m.compute_losses(batch.images, batch.targets, prompter)

    info = {"pretrain": {"prompts": dataclasses.asdict(prompt_cfg), "train_backbone": train_backbone,
                         **(extra or {})}}
    return train(model, dataset, model_cfg, cfg, categories, out=out, hooks=hooks, resume=resume, extra=info,
                 step_fn=step)
