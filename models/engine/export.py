"""ONNX export of a K-Net checkpoint: the network in one graph, pre- and post-processing outside it.

The graph (ONNX opset 18; batch, height and width dynamic):

    input  "images"       float32 [B,3,H,W]  RGB resized so that the short side is `short_side` and
                                             the long side at most `max_long_side`, ImageNet-normalised
                                             ((x / 255 - mean) / std), zero-padded at the bottom and right
                                             to multiples of 32 (and to at least `min_side`)
    output "class_probs"  float32 [B,N,K]    each of the N kernels' class probabilities (sigmoid)
    output "mask_probs"   float32 [B,N,H/4,W/4]  each kernel's mask probability at stride 4

Everything else (crop to the unpadded area, rescoring by mask quality, top-k over kernels x classes,
Matrix NMS, resizing to the original size, the mask threshold) is post-processing in
client/onnx_model.py, which needs numpy, Pillow and onnxruntime only. The model's own settings for it
(categories, sizes, thresholds) travel in the file's metadata under the key "uplvp" (JSON), so the
.onnx file is all a user needs.

Only K-Net exports: torchvision's Mask R-CNN keeps data-dependent control flow (proposals, RoI
pooling per image) that this graph format does not hold well; its checkpoints serve with PyTorch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig
from models.errors import CheckpointError, UplvpError

ONNX_FORMAT = "uplvp-onnx/1"
OPSET = 18
SIZE_DIVISOR = 32


class ExportError(UplvpError):
    """A model that cannot be exported in the format asked for (the message lists the formats on offer)."""

    code = "export_unsupported"


class KNetGraph(nn.Module):
    """What the ONNX graph computes: images [B,3,H,W] -> (class_probs [B,N,K], mask_probs [B,N,H/4,W/4]).

    The last stage's outputs, as models.engine.predict.knet_detections reads them before its top-k.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.cfg: ModelConfig = net.cfg

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from models.nets.criterion import upsample2

        last = self.net(images)["stages"][-1]
        masks = last["masks"] if self.cfg.mask_stride == 4 else upsample2(last["masks"])
        return last["logits"].sigmoid(), masks.sigmoid()


def min_side(num_kernels: int) -> int:
    """The smallest padded side the graph accepts: K-Net's centre kernels need at least N cells of the
    stride-8 grid to start from (models.nets.knet.select_peaks), so (side / 8)^2 >= N."""
    return SIZE_DIVISOR * max(2, math.ceil(math.sqrt(num_kernels) * 8 / SIZE_DIVISOR))


def onnx_metadata(state: dict[str, Any]) -> dict[str, Any]:
    """What the numpy pre- and post-processing needs, read from a checkpoint's state."""
    from models.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    cfg: ModelConfig = state["model_config"]
    tcfg = state["train_config"]
    return {
        "format": ONNX_FORMAT,
        "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in state["categories"]],
        "short_side": tcfg.short_side, "max_long_side": tcfg.max_long_side, "size_divisor": SIZE_DIVISOR,
        "min_side": min_side(cfg.num_kernels), "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "mask_stride": 4, "mask_threshold": cfg.mask_threshold, "max_per_image": cfg.max_per_image,
        "rescore": cfg.rescore, "nms": cfg.nms, "num_kernels": cfg.num_kernels,
    }


def export_onnx(checkpoint: str | Path, out: str | Path, verify: bool = True) -> dict[str, Any]:
    """Export a K-Net checkpoint to an ONNX file at `out` (written atomically).

    Returns the metadata written into the file plus {"path", "bytes", "max_abs_diff"} (the largest
    difference between ONNX Runtime and PyTorch on a test input, when `verify`). Raises ExportError for
    a Mask R-CNN checkpoint and CheckpointError for an unreadable one.
    """
    import onnx

    from models.engine.checkpoint import load_model
    from models.engine.inference import prepare_for_inference
    from models.nets.knet import KNetSegmenter

    model, state = load_model(checkpoint)
    if not isinstance(model, KNetSegmenter):
        raise ExportError(f"{Path(checkpoint).name}: a {state['model_config'].arch} model exports only as "
                          f"a checkpoint; formats on offer: pt (onnx is for K-Net models)")
    if state.get("train_config") is None:
        raise CheckpointError(f"{checkpoint}: the checkpoint has no train config (its input size); "
                              "export a checkpoint written by `uplvp finetune`")
    meta = onnx_metadata(state)
    graph = KNetGraph(prepare_for_inference(model).net).eval()
    # trace at the shape most images get (a landscape photo at the trained size)
    side = max(meta["min_side"], math.ceil(meta["short_side"] / SIZE_DIVISOR) * SIZE_DIVISOR)
    long = max(side, math.ceil(meta["max_long_side"] / SIZE_DIVISOR) * SIZE_DIVISOR)
    example = torch.randn(2, 3, side, long)
    lo = meta["min_side"] // SIZE_DIVISOR
    h = SIZE_DIVISOR * torch.export.Dim("h32", min=lo, max=128)
    w = SIZE_DIVISOR * torch.export.Dim("w32", min=lo, max=128)
    dynamic = {"images": {0: torch.export.Dim("batch", min=1, max=256), 2: h, 3: w}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(graph, (example,), input_names=["images"], dynamo=True,
                                    output_names=["class_probs", "mask_probs"], dynamic_shapes=dynamic,
                                    opset_version=OPSET, external_data=False, verbose=False)
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        proto.metadata_props.add(key="uplvp", value=json.dumps(meta))
        proto.producer_name = "uplvp"
        onnx.save(proto, str(tmp))
        info = dict(meta)
        if verify:
            info["max_abs_diff"] = _max_abs_diff(graph, tmp, side, long)
    tmp.replace(out)
    info.update(path=str(out), bytes=out.stat().st_size)
    return info


def _max_abs_diff(graph: KNetGraph, path: Path, side: int, long: int) -> float:
    """Largest |ONNX Runtime - PyTorch| over both outputs, on a random input of another shape than the
    traced one (so that the dynamic axes are exercised)."""
    import numpy as np
    import onnxruntime as ort

    x = torch.randn(1, 3, long, side + SIZE_DIVISOR)
    want = [t.numpy() for t in graph(x)]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})
    return float(max(np.abs(a - b).max() for a, b in zip(want, got)))
