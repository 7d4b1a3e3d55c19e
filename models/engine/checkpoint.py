"""Checkpoints that carry everything needed to rebuild, resume or reuse a model.

Contents: format tag, model and train configs, the category list (COCO ids and names),
the training history, the weights, and (for resuming) optimizer state and step (the
training loop re-seeds every epoch, so no RNG state is needed to resume exactly).
Writes are atomic (temp file + fsync + rename) so a crash never leaves a half-written model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig, TrainConfig, config_from_dict, config_to_dict
from models.errors import CheckpointError

FORMAT = "uplvp-checkpoint/1"


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig | None,
    categories: list[dict],
    history: list[dict],
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically. `categories` is the COCO list [{"id", "name"}] in class-index order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "model_config": config_to_dict(model_cfg),
        "train_config": config_to_dict(train_cfg) if train_cfg else None,
        "categories": categories,
        "history": history,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},  # loads on any device
        "optimizer": optimizer.state_dict() if optimizer else None,
        "epoch": epoch,
        "step": step,
        "extra": extra or {},
    }
    return _atomic_save(state, path)


def _atomic_save(state: dict[str, Any], path: Path) -> Path:
    """torch.save to a temp file beside `path`, fsync, rename: a crash never leaves half a checkpoint."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export_for_serving(src: str | Path, dest: str | Path) -> Path:
    """Copy a training checkpoint without its optimizer state (a third of the size; what gets served)."""
    state = torch.load(Path(src), map_location="cpu", weights_only=False)
    state["optimizer"] = None
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return _atomic_save(state, dest)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint; raises CheckpointError with the file name on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an uplvp checkpoint (expected format {FORMAT!r})")
    state["model_config"] = config_from_dict(ModelConfig, state["model_config"])
    if state.get("train_config"):
        state["train_config"] = config_from_dict(TrainConfig, state["train_config"])
    return state


def load_model(path: str | Path, backbone_weights: str = "none") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from its checkpoint (no ImageNet weights needed: the checkpoint has them all)."""
    from models.nets.build import build_model

    state = load_checkpoint(path)
    cfg: ModelConfig = state["model_config"]
    cfg.backbone_weights = backbone_weights  # type: ignore[assignment]
    tcfg = state.get("train_config") or TrainConfig()
    model = build_model(cfg, tcfg.short_side, tcfg.max_long_side)
    model.load_state_dict(state["model"])
    return model, state


# Tensors whose first dimension is the class list (K-Net's semantic-seg conv and the class
# layer of every update stage). Only these depend on the vocabulary.
CLASS_HEAD_SUFFIXES = ("conv_seg.weight", "conv_seg.bias", "cls_head.3.weight", "cls_head.3.bias",
                       "class_probe.fc.weight", "class_probe.fc.bias")


def is_class_head(key: str) -> bool:
    return key.endswith(CLASS_HEAD_SUFFIXES)


def init_from(model: nn.Module, path: str | Path, categories: list[dict] | None = None) -> dict[str, Any]:
    """Initialise `model` from any earlier checkpoint (a fine-tuned model or a UPLVP pre-training).

    Tensors whose shapes match are loaded. The class head depends on the vocabulary: when
    `categories` (the new model's, COCO dicts with "name") are the checkpoint's categories by
    name (in any order), its rows are permuted to the new order and transferred; otherwise it
    keeps its fresh initialisation and `class_head` says why.

    Returns {"loaded", "reinitialised" (shape differs), "missing" (not in the checkpoint),
    "unexpected", "class_head": "transferred" | "reordered" | "re-initialised: <reason>"}.
    """
    state = load_checkpoint(path)
    src = dict(state["model"])
    own = model.state_dict()
    class_head = "transferred"
    if categories is not None:
        src_names = [c["name"] for c in state.get("categories", [])]
        new_names = [c["name"] for c in categories]
        if sorted(src_names) == sorted(new_names):
            if src_names != new_names:
                order = torch.tensor([src_names.index(n) for n in new_names])
                for k in src:
                    if is_class_head(k):
                        src[k] = src[k][order]
                class_head = "reordered"
        else:
            for k in [k for k in src if is_class_head(k)]:
                del src[k]
            only_src = [n for n in src_names if n not in new_names]
            only_new = [n for n in new_names if n not in src_names]
            class_head = (f"re-initialised: the checkpoint's {len(src_names)} categories are not this dataset's "
                          f"{len(new_names)} (only in checkpoint: {', '.join(only_src[:5]) or '-'}; "
                          f"only in dataset: {', '.join(only_new[:5]) or '-'})")
    matched = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    return {
        "loaded": sorted(matched),
        "reinitialised": sorted(k for k in src if k in own and own[k].shape != src[k].shape),
        "missing": sorted(k for k in own if k not in src),
        "unexpected": sorted(k for k in src if k not in own),
        "class_head": class_head,
    }
