"""The clip engine's mechanics with a randomly initialised small open_clip ViT (no CLIP weights
exist offline, so nothing here says anything about quality)."""

import pytest
import torch
from PIL import Image

from models.errors import ConfigError
from models.uplvp.proposals.clip_engine import ClipEngine

VOCAB = ["cat", "dog", "car", "person"]


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return ClipEngine(VOCAB, pretrained=None, arch="ViT-S-32", image_size=224)


def test_dense_features_shape_and_norm(engine, chelsea):
    f = engine.dense_features(chelsea)  # 300 x 451 -> short side 224: 224 x 337 -> /32 grid
    h, w = round(224 / 32), round(451 * 224 / 300 / 32)
    assert f.shape[:2] == (h, w)
    assert torch.allclose(f.norm(dim=-1), torch.ones(h, w), atol=1e-4)
    assert f.shape[-1] == engine.text.shape[-1]


def test_text_embeddings_are_unit_norm_per_word(engine):
    t = engine.text_embeddings(["cat", "dog"])
    assert t.shape == (2, engine.text.shape[1])
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-4)
    assert len(engine.text) == len(VOCAB) + len(engine.background)


def test_per_pixel_classification_is_softmax_of_scaled_cosine(engine, chelsea, monkeypatch):
    f = engine.dense_features(chelsea)
    text = torch.nn.functional.normalize(torch.randn(6, f.shape[-1]), dim=-1)
    text[2] = f[3, 4]  # class 2's embedding is exactly patch (3, 4)'s feature
    monkeypatch.setattr(engine, "text", text)
    probs = engine.class_probs(f)
    assert probs.shape == (6, *f.shape[:2])
    assert torch.allclose(probs.sum(0), torch.ones(f.shape[:2]), atol=1e-5)
    assert probs[:, 3, 4].argmax() == 2
    expected = torch.softmax(100 * f[1, 1] @ text.T, -1)
    assert torch.allclose(probs[:, 1, 1], expected, atol=1e-6)


def test_propose_output_contract(engine, chelsea):
    props = engine.propose(chelsea, 5)
    assert len(props) <= 5
    for p in props:
        assert p.mask.shape == (300, 451) and p.mask.dtype == bool and p.mask.any()
        assert p.category in VOCAB  # never a background word
        assert 0 <= p.score <= 1
    assert [p.score for p in props] == sorted((p.score for p in props), reverse=True)


@pytest.mark.parametrize("size", [(8, 8), (320, 240)])
def test_black_and_tiny_images(engine, size):
    assert len(engine.propose(Image.new("RGB", size), 3)) <= 3


def test_bad_construction_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="empty vocabulary"):
        ClipEngine([], pretrained=None, arch="ViT-S-32")
    with pytest.raises(ConfigError, match="unknown open_clip architecture"):
        ClipEngine(["cat"], pretrained=None, arch="ViT-Z-99")
    with pytest.raises(ConfigError, match="checkpoint file not found"):
        ClipEngine(["cat"], pretrained=str(tmp_path / "clip.pt"), arch="ViT-S-32")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="cannot load CLIP weights"):
        ClipEngine(["cat"], pretrained=str(garbage), arch="ViT-S-32")
    wrong = tmp_path / "wrong.pt"
    torch.save({"foo": torch.zeros(3)}, wrong)
    with pytest.raises(ConfigError, match="cannot load CLIP weights"):
        ClipEngine(["cat"], pretrained=str(wrong), arch="ViT-S-32")


def test_a_local_checkpoint_file_is_loaded(engine, tmp_path, monkeypatch):
    path = tmp_path / "vit_s_32.pt"
    torch.save(engine.model.state_dict(), path)
    from models.uplvp.proposals import build_engine

    monkeypatch.setenv("UPLVP_CLIP_PRETRAINED", str(path))
    monkeypatch.setenv("UPLVP_CLIP_ARCH", "ViT-S-32")
    loaded = build_engine("clip", VOCAB)
    assert loaded.name == "clip"
    assert torch.allclose(loaded.text, engine.text, atol=1e-5)  # same weights -> same text embeddings
