"""The `clip` proposal engine: the method as published, for users who have CLIP weights.

MaskCLIP-style dense features from an open_clip ViT (method.md §2, "Doing it with open_clip
alone"): the visual transformer runs up to the input of its last residual block; in that block
only the value path is kept, v = out_proj(W_v · ln_1(x)) (no q·k attention, no residual, no MLP:
the ClearCLIP variant, whose maps are cleaner than keeping the residual), then ln_post and the
joint-space projection give one unit vector per patch. Text embeddings of the vocabulary (prompt
templates, averaged) make per-pixel class probabilities; instances come from (A) connected
components of confident class regions and (B) FreeMask self-similarity proposals labelled by
mask-pooling, de-duplicated, at most K per image.

Weights come from `pretrained`: an open_clip tag (downloaded where a network exists) or a local
checkpoint file. `None` builds random weights, for tests of the mechanics only: nothing about
quality can be said without real weights. In Docker, bake a file in at build time and point
UPLVP_CLIP_PRETRAINED at it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.engine.predict import matrix_nms
from models.errors import ConfigError
from models.uplvp.proposals.base import PseudoMask
from models.uplvp.proposals.postprocess import (
    components_per_class,
    greedy_dedupe,
    self_similarity_masks,
)

TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of a large {}.",
             "there is a {} in the scene.", "a cropped photo of a {}.")
BACKGROUND = ("sky", "wall", "floor", "ceiling", "grass", "road", "ground", "tree", "water", "building", "background")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith(CHECKPOINT_SUFFIXES)


class ClipEngine:
    """Pseudo masks from open_clip dense features (MaskCLIP value path) and text embeddings."""

    name = "clip"

    def __init__(self, vocabulary: list[str], pretrained: str | None, arch: str = "ViT-B-16",
                 image_size: int = 448, prob_threshold: float = 0.4, min_area_frac: float = 0.005,
                 background_words: tuple[str, ...] = BACKGROUND) -> None:
        import open_clip

        if not vocabulary:
            raise ConfigError("empty vocabulary: give category names, e.g. --vocab 'cat,dog' or --vocab coco")
        if arch not in open_clip.list_models():
            vits = [m for m in open_clip.list_models() if m.startswith("ViT-B")][:5]
            raise ConfigError(f"unknown open_clip architecture {arch!r}; e.g. {', '.join(vits)}")
        if pretrained and _looks_like_path(pretrained) and not Path(pretrained).is_file():
            raise ConfigError(f"{pretrained}: CLIP checkpoint file not found (UPLVP_CLIP_PRETRAINED / --clip-pretrained)")
        try:
            model = open_clip.create_model(arch, pretrained=pretrained or None)
        except Exception as exc:  # noqa: BLE001 - open_clip raises many types for a bad file or tag
            raise ConfigError(f"cannot load CLIP weights {pretrained!r} for {arch}: {str(exc)[:200]} "
                              "(give a checkpoint of that architecture or an open_clip pretrained tag)") from None
        from open_clip.transformer import VisionTransformer

        if not isinstance(model.visual, VisionTransformer):
            raise ConfigError(f"{arch}: the clip engine needs a ViT image tower (MaskCLIP uses its value path)")
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.vocabulary = list(vocabulary)
        self.background = [w for w in background_words if w not in self.vocabulary]
        self.image_size = image_size
        self.prob_threshold = prob_threshold
        self.min_area_frac = min_area_frac
        visual = model.visual
        self.patch = visual.conv1.kernel_size[0]
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))[:, None, None]
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD))[:, None, None]
        self.text = self.text_embeddings(self.vocabulary + self.background)  # [C, D]

    @torch.inference_mode()
    def text_embeddings(self, words: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings [len(words), D]: templates encoded, normalised, averaged, re-normalised."""
        out = []
        for w in words:
            e = F.normalize(self.model.encode_text(self.tokenizer([t.format(w) for t in TEMPLATES])), dim=-1)
            out.append(F.normalize(e.mean(0), dim=-1))
        return torch.stack(out)

    def _input(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        scale = self.image_size / min(h, w)
        if max(h, w) * scale > 2 * self.image_size:  # cap the long side at 2x the short one
            scale = 2 * self.image_size / max(h, w)
        nh = max(self.patch, round(h * scale / self.patch) * self.patch)
        nw = max(self.patch, round(w * scale / self.patch) * self.patch)
        x = torch.from_numpy(np.asarray(image.convert("RGB").resize((nw, nh), Image.BICUBIC), dtype=np.float32))
        return ((x.permute(2, 0, 1) / 255.0 - self.mean) / self.std)[None]

    @torch.inference_mode()
    def dense_features(self, image: Image.Image) -> torch.Tensor:
        """Unit-norm per-patch features in the joint space: [h, w, D] with (h, w) = input size / patch."""
        v = self.model.visual
        x = self._input(image)
        gh, gw = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        tokens = v.conv1(x).flatten(2).transpose(1, 2)  # [1, h*w, width]
        pos = v.positional_embedding
        n0 = round((pos.shape[0] - 1) ** 0.5)
        grid = pos[1:].reshape(1, n0, n0, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)  # any input size
        grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)
        cls = v.class_embedding.view(1, 1, -1)
        x = torch.cat([cls + pos[:1], tokens + grid], dim=1)
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        for blk in blocks[:-1]:
            x = blk(x)
        last = blocks[-1]
        attn = last.attn
        d = x.shape[-1]
        y = last.ln_1(x)
        val = F.linear(y, attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None)
        x = attn.out_proj(val)  # value path only
        x = v.ln_post(x[:, 1:])  # drop CLS
        if v.proj is not None:
            x = x @ v.proj
        return F.normalize(x[0], dim=-1).view(gh, gw, -1)

    def class_probs(self, feats: torch.Tensor) -> torch.Tensor:
        """Per-patch class probabilities softmax(100 <F, t>) over vocabulary + background: [C, h, w]."""
        return (100.0 * feats @ self.text.T).softmax(-1).permute(2, 0, 1)

    @torch.inference_mode()
    def propose(self, image: Image.Image, max_masks: int) -> list[PseudoMask]:
        """At most `max_masks` labelled pseudo masks for one RGB image, best first."""
        W, H = image.size
        feats = self.dense_features(image)  # [h, w, D]
        h, w, _ = feats.shape
        n_vocab = len(self.vocabulary)
        probs = F.interpolate(self.class_probs(feats)[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        masks, labels, scores = [], [], []
        # (A) confident class regions; background classes take part in the argmax but are never output
        for m, k, s in components_per_class(probs.numpy(), self.prob_threshold, self.min_area_frac):
            if k < n_vocab:
                masks.append(torch.from_numpy(m))
                labels.append(k)
                scores.append(min(1.0, s))
        # (B) FreeMask self-similarity proposals, labelled by the mask-pooled feature
        soft, maskness = self_similarity_masks(feats.permute(2, 0, 1))
        binary = soft >= 0.5
        if binary.any():
            keep = matrix_nms(binary, maskness).argsort(descending=True)[:50]
            weights = (soft * binary)[keep].flatten(1)
            pooled = F.normalize(weights @ feats.reshape(h * w, -1), dim=-1)
            p = (100.0 * pooled @ self.text.T).softmax(-1)
            conf, lab = p.max(-1)
            up = F.interpolate((soft * binary)[keep][:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
            for i in range(len(keep)):
                if lab[i] < n_vocab and conf[i] >= self.prob_threshold and (up[i] >= 0.25).any():
                    masks.append(up[i] >= 0.25)
                    labels.append(int(lab[i]))
                    scores.append(float(maskness[keep[i]] * conf[i]))
        if not masks:
            return []
        mt, st = torch.stack(masks), torch.tensor(scores).clamp(0, 1)
        st = matrix_nms(mt, st)
        keep_idx = greedy_dedupe(mt, st, 0.7, max_masks)
        return [PseudoMask(mt[i].numpy(), self.vocabulary[labels[i]], float(st[i])) for i in keep_idx]
