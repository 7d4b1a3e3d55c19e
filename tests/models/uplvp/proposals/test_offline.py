"""The offline engine: MobileNetV2 (ImageNet) + all-MiniLM-L6-v2, both installed from PyPI."""

import numpy as np
import pytest
import torch
from PIL import Image

from models.errors import ConfigError
from models.uplvp.proposals.language import (
    SentenceEncoder,
    grounded_words,
    imagenet_descriptions,
    vocabulary_to_imagenet,
)

TABBY, GOLDEN_RETRIEVER, SPORTS_CAR = 281, 207, 817


def test_vocabulary_to_imagenet_assignment_rules():
    imagenet = torch.eye(4)  # 4 "ImageNet classes"
    vocab = torch.nn.functional.normalize(torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0]]), dim=1)
    owner = vocabulary_to_imagenet(vocab, imagenet, threshold=0.5, top_k=1)
    assert owner.shape == (2, 4)
    assert owner[0].tolist() == [1, 1, 0, 0]  # both similar classes go to word 0
    assert owner[1].tolist() == [0, 0, 1, 0]  # below threshold, but every word owns its top-1


def test_minilm_maps_words_to_the_right_imagenet_classes(offline_engine):
    owner = offline_engine.owner  # vocabulary cat, dog, car, person
    descriptions = imagenet_descriptions()
    assert descriptions[TABBY].startswith("tabby")
    assert owner[0, TABBY] == 1 and owner[1, TABBY] == 0
    assert owner[1, GOLDEN_RETRIEVER] == 1 and owner[0, GOLDEN_RETRIEVER] == 0
    assert owner[2, SPORTS_CAR] == 1
    assert owner[3].sum() >= 3  # "person" has no ImageNet class, yet it listens to its nearest ones


def test_grounded_words_are_those_imagenet_has_a_class_for():
    imagenet = torch.eye(4)
    vocab = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]]), dim=1)
    assert grounded_words(vocab, imagenet, threshold=0.6).tolist() == [True, False]


def test_a_word_imagenet_lacks_still_gets_masks(chelsea):
    """A one-word vocabulary ImageNet has no class for (MiniLM cosine < 0.35) is labelled on every
    mask instead of losing them all to the probability floor, as "nucleus" did; a grounded word
    keeps its floor."""
    from models.uplvp.proposals import build_engine

    engine = build_engine("offline", ["nucleus"])
    assert engine.grounded.tolist() == [False]
    props = engine.propose(chelsea, 10)
    assert props and all(p.category == "nucleus" for p in props)
    scores = [p.score for p in props]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    assert build_engine("offline", ["cat"]).grounded.tolist() == [True]


def test_sentence_encoder_is_offline_and_normalised():
    enc = SentenceEncoder()
    e = enc.encode(["a cat", "a kitten", "a truck"])
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-4)
    assert e[0] @ e[1] > e[0] @ e[2]


def test_cat_photo_gets_a_cat_mask_that_covers_the_cat(offline_engine, chelsea, cat_region):
    props = offline_engine.propose(chelsea, 10)
    assert 1 <= len(props) <= 10
    assert all(p.mask.shape == (300, 451) and p.mask.dtype == bool for p in props)
    assert all(p.category in ("cat", "dog", "car", "person") for p in props)
    scores = [p.score for p in props]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    cats = [p for p in props if p.category == "cat"]
    assert cats, f"no mask labelled cat among {[p.category for p in props]}"
    ious = [(p.mask & cat_region).sum() / (p.mask | cat_region).sum() for p in cats]
    best = cats[int(np.argmax(ious))]
    assert max(ious) >= 0.5
    assert best.mask[150, 225]  # the cat's centre (between the eyes, above the nose)
    assert props[0].category == "cat"  # the most confident proposal is a cat


def test_k_is_respected(offline_engine, chelsea):
    for k in (1, 3):
        assert len(offline_engine.propose(chelsea, k)) <= k


@pytest.mark.parametrize("size", [(8, 8), (640, 480), (1, 300)])
def test_black_and_tiny_images_do_not_crash(offline_engine, size):
    props = offline_engine.propose(Image.new("RGB", size), 5)
    assert len(props) <= 5
    assert all(p.mask.shape == (size[1], size[0]) for p in props)


def test_empty_vocabulary_is_refused():
    from models.uplvp.proposals.offline import OfflineEngine

    with pytest.raises(ConfigError, match="empty vocabulary"):
        OfflineEngine([])


def test_maskcut_engine_adds_normalized_cuts_and_still_finds_the_cat(chelsea, cat_region):
    from models.uplvp.proposals import build_engine

    engine = build_engine("maskcut", ["cat", "dog", "car", "person"])
    assert engine.name == "maskcut" and engine.cfg.ncut_cuts > 0
    props = engine.propose(chelsea, 10)
    assert 1 <= len(props) <= 10 and all(p.mask.shape == (300, 451) for p in props)
    cats = [p for p in props if p.category == "cat"]
    assert cats and max((p.mask & cat_region).sum() / (p.mask | cat_region).sum() for p in cats) >= 0.5


def test_normalized_cuts_alone_are_an_engine_too(chelsea):
    """The ablation switches: with FreeMask, CAM regions and energy components off, the cuts alone propose."""
    from dataclasses import replace

    from models.uplvp.proposals import build_engine

    engine = build_engine("maskcut", ["cat", "dog", "car", "person"])
    engine.cfg = replace(engine.cfg, use_similarity=False, use_cam=False, energy_levels=(), group_segments=False)
    props = engine.propose(chelsea, 10)
    assert 1 <= len(props) <= 10 and all(p.mask.shape == (300, 451) for p in props)
    engine.cfg = replace(engine.cfg, ncut_cuts=0)
    assert engine.propose(chelsea, 10) == []  # every generator off: nothing, not a crash


def test_grouped_segments_join_the_other_generators_and_propose_alone(chelsea, cat_region):
    """Generator (E), colour segments grouped by feature similarity: with the others, the cat is still found
    (it fills 78 % of the photo, more than E's 60 % cap); alone, E proposes labelled masks within its cap."""
    from dataclasses import replace

    from models.uplvp.proposals import build_engine

    engine = build_engine("maskcut", ["cat", "dog", "car", "person"])
    assert engine.cfg.group_segments  # the maskcut engine's default
    props = engine.propose(chelsea, 10)
    cats = [p for p in props if p.category == "cat"]
    assert cats and max((p.mask & cat_region).sum() / (p.mask | cat_region).sum() for p in cats) >= 0.5
    engine.cfg = replace(engine.cfg, use_similarity=False, use_cam=False, energy_levels=(), ncut_cuts=0)
    props = engine.propose(chelsea, 10)
    assert 1 <= len(props) <= 10 and all(p.mask.shape == (300, 451) and p.mask.mean() <= 0.6 for p in props)
    scores = [p.score for p in props]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
