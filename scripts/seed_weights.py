"""Seed torch's hub checkpoint cache with the offline MobileNetV2 ImageNet weights (run by `make setup`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.nets.weights import ensure_mobilenet_weights  # noqa: E402

if __name__ == "__main__":
    print(f"MobileNetV2 ImageNet weights: {ensure_mobilenet_weights()}")
