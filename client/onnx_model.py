"""Run an exported uplvp model with ONNX Runtime, numpy and Pillow only: no torch, no uplvp service.

    from PIL import Image
    from client.onnx_model import OnnxSegmenter

    seg = OnnxSegmenter("shapes.onnx")                    # `uplvp export` or GET .../download?format=onnx
    for inst in seg(Image.open("photo.jpg")):             # seg.predict([...]) for several images
        print(inst["category_name"], inst["score"], inst["bbox"], inst["mask"].shape)

This file depends on nothing else in uplvp: copy it next to your script if you like. The graph and
its inputs and outputs are described in models/engine/export.py; this module is the rest of the
pipeline, the same steps as models.engine.predict (what the service runs with PyTorch):

1. pre-process: RGB; resize (bilinear) so that the short side is `short_side` and the long side at most
   `max_long_side`; (x / 255 - mean) / std; zero-pad bottom and right to multiples of 32;
2. the graph: class probabilities [N,K] and mask probabilities [N,H/4,W/4] per image;
3. post-process: crop the masks to the unpadded area; multiply each class probability by its mask's
   quality (the mean probability inside the mask); keep the top `max_per_image` (kernel, class) pairs;
   Matrix NMS among masks of one class; drop scores under `score_threshold`; resize the masks to the
   original size (bilinear) and keep pixels above `mask_threshold`.

Each instance: {"category_id", "category_name", "score", "bbox" [x, y, w, h], "area", "mask" (bool
[height, width])}, best first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ONNX_FORMAT = "uplvp-onnx/1"


class OnnxSegmenter:
    """An exported model in an ONNX Runtime session, with its pre- and post-processing."""

    def __init__(self, path: str | Path, num_threads: int = 0, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        raw = self.session.get_modelmeta().custom_metadata_map.get("uplvp")
        if raw is None:
            raise ValueError(f"{path}: not an uplvp ONNX export (no 'uplvp' metadata); export it with `uplvp export`")
        self.meta: dict[str, Any] = json.loads(raw)
        if self.meta.get("format") != ONNX_FORMAT:
            raise ValueError(f"{path}: export format {self.meta.get('format')!r}, this module reads {ONNX_FORMAT!r}")
        m = self.meta
        self.categories = m["categories"]
        # (x / 255 - mean) / std as one multiply-add per pixel, as the training pipeline computes it
        self._scale = np.array([1.0 / (255.0 * s) for s in m["std"]], np.float32)
        self._shift = np.array([-a / s for a, s in zip(m["mean"], m["std"])], np.float32)

    def __call__(self, image: Image.Image | str | Path, score_threshold: float = 0.3) -> list[dict[str, Any]]:
        return self.predict([image], score_threshold)[0]

    # ------------------------------------------------------------------ pre-processing

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the model sees: short side -> short_side unless the long side would pass max_long_side."""
        scale = min(self.meta["short_side"] / min(height, width), self.meta["max_long_side"] / max(height, width))
        return max(1, int(round(height * scale))), max(1, int(round(width * scale)))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> float32 [3, h, w], resized and normalised."""
        h, w = self.resized_shape(image.height, image.width)
        x = np.asarray(image.resize((w, h), Image.BILINEAR), dtype=np.uint8).astype(np.float32)
        return (x * self._scale + self._shift).transpose(2, 0, 1)

    def batch(self, arrays: list[np.ndarray]) -> np.ndarray:
        """[3, h_i, w_i] arrays -> [B, 3, Hp, Wp] zero-padded at the bottom and right (0 is the mean)."""
        d, lo = self.meta["size_divisor"], self.meta["min_side"]
        hp = max(lo, math.ceil(max(a.shape[1] for a in arrays) / d) * d)
        wp = max(lo, math.ceil(max(a.shape[2] for a in arrays) / d) * d)
        out = np.zeros((len(arrays), 3, hp, wp), np.float32)
        for i, a in enumerate(arrays):
            out[i, :, : a.shape[1], : a.shape[2]] = a
        return out

    # ------------------------------------------------------------------ the whole pipeline

    def predict(self, images: list[Image.Image | str | Path], score_threshold: float = 0.3,
                batch_size: int = 4, mask_threshold: float | None = None) -> list[list[dict[str, Any]]]:
        """Images (PIL or paths) -> per image, its instances (see the module docstring); `mask_threshold`
        defaults to the model's own."""
        pil = [to_rgb(Image.open(p) if isinstance(p, (str, Path)) else p) for p in images]
        prepared = [self.preprocess(im) for im in pil]
        # images of similar shape together, so that each batch pads as little as possible
        order = sorted(range(len(pil)), key=lambda i: prepared[i].shape[1:])
        out: list[list[dict[str, Any]]] = [[] for _ in pil]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            class_probs, mask_probs = self.session.run(None, {"images": self.batch([prepared[i] for i in idx])})
            for j, i in enumerate(idx):
                size = prepared[i].shape[1:]
                out[i] = self.postprocess(class_probs[j], mask_probs[j], size, (pil[i].height, pil[i].width),
                                          score_threshold, mask_threshold)
        return out

    def postprocess(self, class_probs: np.ndarray, mask_probs: np.ndarray, input_size: tuple[int, int],
                    orig_size: tuple[int, int], score_threshold: float = 0.3,
                    mask_threshold: float | None = None) -> list[dict[str, Any]]:
        """One image's graph outputs ([N,K], [N,Hp/4,Wp/4]) -> its instances at `orig_size` (h, w)."""
        m = self.meta
        thr = m["mask_threshold"] if mask_threshold is None else mask_threshold
        h, w = input_size
        probs = mask_probs[:, : math.ceil(h / m["mask_stride"]), : math.ceil(w / m["mask_stride"])]
        n, k = class_probs.shape
        cls = class_probs
        if m["rescore"]:
            binary = probs > thr
            quality = (probs * binary).reshape(n, -1).sum(1) / np.maximum(binary.reshape(n, -1).sum(1), 1)
            cls = cls * quality[:, None]
        flat = cls.reshape(-1)
        top = np.argsort(-flat, kind="stable")[: min(m["max_per_image"], flat.size)]
        scores, kernel, label = flat[top], top // k, top % k
        chosen = probs[kernel]
        if m["nms"] and len(scores) > 1:
            scores = matrix_nms(chosen > thr, scores, label)
            order = np.argsort(-scores, kind="stable")
            scores, label, chosen = scores[order], label[order], chosen[order]
        keep = scores >= score_threshold
        scores, label, chosen = scores[keep], label[keep], chosen[keep]
        out = []
        for start in range(0, len(scores), 16):  # 16 full-size masks at a time bound the memory
            full = resize_bilinear(chosen[start : start + 16], orig_size) > thr
            for j, mask in enumerate(full):
                c = self.categories[int(label[start + j])]
                out.append({"category_id": c["id"], "category_name": c["name"], "score": float(scores[start + j]),
                            "bbox": mask_bbox(mask), "area": int(mask.sum()), "mask": mask})
        return out


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, keeping the top 8 bits of 16-bit greyscale (Pillow's own conversion clips it at 255)."""
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def matrix_nms(masks: np.ndarray, scores: np.ndarray, labels: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Gaussian Matrix NMS (SOLOv2) among masks of one label: masks bool [M,h,w], scores [M] -> decayed [M]."""
    order = np.argsort(-scores, kind="stable")
    flat = masks[order].reshape(len(order), -1).astype(np.float32)
    inter = flat @ flat.T
    area = flat.sum(1)
    iou = np.triu(inter / np.maximum(area[:, None] + area[None, :] - inter, 1), k=1)  # [i, j]: i better
    lab = labels[order]
    iou = iou * (lab[:, None] == lab[None, :])
    compensate = iou.max(0)[:, None]  # how much each better mask was itself suppressed
    decay = np.exp(-sigma * (iou**2 - compensate**2)).min(0)
    out = np.empty_like(scores)
    out[order] = scores[order] * decay
    return out


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation with half-pixel centres (align_corners=False)."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(np.float32)
    r = np.zeros((n_out, n_in), np.float32)
    np.add.at(r, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(r, (np.arange(n_out), i1), frac)
    return r


def resize_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of [M,h,w] float maps to [M,*size], as torch's interpolate(align_corners=False)."""
    ry, rx = _interp_matrix(maps.shape[1], size[0]), _interp_matrix(maps.shape[2], size[1])
    return ry @ maps.astype(np.float32) @ rx.T


def mask_bbox(mask: np.ndarray) -> list[float]:
    """[x, y, w, h] of a binary mask's pixels (COCO's convention: pycocotools' toBbox), zeros when empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]
