"""Running a trained model: over a COCO dataset (for evaluation) or over image files (for users).

The inference path runs under `torch.inference_mode`, in channels_last memory format
(faster convolutions on CPU), and batches images of similar size together. `OnnxPredictor` is the
same interface over a K-Net's ONNX export under ONNX Runtime (faster on CPU: bench/results/inference.md).
Both run where they are told (`device`): a Predictor moves its model there, an OnnxPredictor on a
CUDA device asks ONNX Runtime for its CUDA execution provider (models.engine.device).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from models.engine.predict import detections_to_instances

# Detections below this score are left out of evaluation, as torchvision's Mask R-CNN
# (box_score_thresh) and Detectron2 do at test time: each costs a full-resolution mask
# resize and RLE encoding, and they add next to nothing to AP.
EVAL_MIN_SCORE = 0.05


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Eval mode, BatchNorm folded into convolutions, channels_last weights (see bench/ for the gains)."""
    from models.nets.backbone import fuse_conv_bn

    model.eval()
    fuse_conv_bn(model.backbone)
    return model.to(memory_format=torch.channels_last)


@torch.inference_mode()
def coco_results(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    category_ids: list[int] | tuple[int, ...],
    category_names: list[str] | tuple[str, ...],
    batch_size: int = 2,
    mask_threshold: float = 0.5,
    progress: bool = False,
) -> list[dict]:
    """Predictions for every image of a CocoDataset (train=False) as a COCO results list."""
    from models.data.dataset import make_loader

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # evaluate where the model is (the training loop's device)
    results: list[dict] = []
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0)
    for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
        images = batch.images.to(device).contiguous(memory_format=torch.channels_last)
        dets = model.detect(images, [t["input_size"] for t in batch.targets])
        for det, t in zip(dets, batch.targets):
            for inst in detections_to_instances(det, t["orig_size"], category_ids, category_names, mask_threshold,
                                                score_threshold=EVAL_MIN_SCORE):
                results.append(
                    {
                        "image_id": t["image_id"],
                        "category_id": inst["category_id"],
                        "segmentation": inst["segmentation"],
                        "score": inst["score"],
                        "bbox": inst["bbox"],
                    }
                )
    model.train(was_training)
    return results


def evaluate_model(
    model: nn.Module,
    annotations: Any,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 2,
    mask_threshold: float = 0.5,
    progress: bool = False,
) -> dict[str, Any]:
    """COCO mask AP of `model` on a validation set (CocoAnnotations + its CocoDataset)."""
    from models.engine.evaluate import evaluate_segm

    cats = annotations.categories
    results = coco_results(model, dataset, cats.ids, cats.names, batch_size, mask_threshold, progress)
    return evaluate_segm(annotations.raw, results, [int(im["id"]) for im in annotations.images])


class Predictor:
    """A loaded checkpoint ready to segment images: ``Predictor(ckpt)(paths) -> [instances per image]``."""

    def __init__(self, checkpoint: str | Path, num_threads: int = 0, device: torch.device | str = "cpu") -> None:
        from models.data.transforms import TransformConfig
        from models.engine.checkpoint import load_model
        from models.engine.device import resolve_device

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = resolve_device(str(device))
        model, state = load_model(checkpoint)  # read onto the CPU whatever device trained it (map_location)
        self.model = prepare_for_inference(model).to(self.device)
        self.cfg = state["model_config"]
        tcfg = state["train_config"]
        self.transform = TransformConfig(short_side=tcfg.short_side, max_long_side=tcfg.max_long_side, flip_prob=0.0)
        self.category_ids = [int(c["id"]) for c in state["categories"]]
        self.category_names = [str(c["name"]) for c in state["categories"]]
        self.history = state["history"]

    @torch.inference_mode()
    def predict_images(
        self,
        images: list[Any],
        score_threshold: float = 0.3,
        mask_threshold: float | None = None,
        with_polygons: bool = False,
        batch_size: int = 4,
    ) -> list[list[dict]]:
        """PIL images -> per image, its instances (see predict.detections_to_instances).

        Images are sorted by shape so each batch pads as little as possible.
        """
        from models.data.dataset import collate_images
        from models.data.transforms import preprocess_image

        thr = self.cfg.mask_threshold if mask_threshold is None else mask_threshold
        prepared = [preprocess_image(img, self.transform) for img in images]
        order = sorted(range(len(images)), key=lambda i: tuple(prepared[i][0].shape[-2:]))
        out: list[list[dict]] = [[] for _ in images]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate_images([prepared[i][0] for i in idx]).to(self.device)
            batch = batch.contiguous(memory_format=torch.channels_last)
            dets = self.model.detect(batch, [prepared[i][1] for i in idx])
            for i, det in zip(idx, dets):
                orig = (images[i].height, images[i].width)
                out[i] = detections_to_instances(
                    det, orig, self.category_ids, self.category_names, thr, score_threshold, with_polygons
                )
        return out


class OnnxPredictor:
    """A K-Net's ONNX export (models.engine.export) under ONNX Runtime, behind Predictor's interface:
    ``OnnxPredictor(model.onnx)(...).predict_images(images) -> [instances per image]``, the same instances
    (RLE segmentation, optional polygons) from client/onnx_model.py's numpy pre- and post-processing."""

    def __init__(self, path: str | Path, num_threads: int = 0, device: torch.device | str = "cpu") -> None:
        from client.onnx_model import OnnxSegmenter

        self.device = torch.device(str(device))
        self.providers = onnx_providers(self.device)
        self.session = OnnxSegmenter(path, num_threads, providers=self.providers)
        self.category_ids = [c["id"] for c in self.session.categories]
        self.category_names = [c["name"] for c in self.session.categories]

    def predict_images(self, images: list[Any], score_threshold: float = 0.3, mask_threshold: float | None = None,
                       with_polygons: bool = False, batch_size: int = 4) -> list[list[dict]]:
        """PIL images -> per image, its instances (as Predictor.predict_images)."""
        from models.data.masks import encode_rle, mask_to_polygons

        out = []
        for instances in self.session.predict(images, score_threshold, batch_size, mask_threshold):
            for inst in instances:
                mask = inst.pop("mask")
                inst["segmentation"] = encode_rle(mask)
                if with_polygons:
                    inst["polygons"] = mask_to_polygons(mask)
            out.append(instances)
        return out


def onnx_providers(device: torch.device | str) -> list[str]:
    """ONNX Runtime execution providers for a device: CUDA's first where the installed onnxruntime has
    it (the onnxruntime-gpu build), always the CPU's as the fall-back for operators CUDA lacks."""
    import onnxruntime as ort

    if torch.device(str(device)).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
