"""UPLVP pre-training: pseudo masks from real photos -> kernels learn them -> fine-tuning init."""

import json

import pytest
import torch
from PIL import Image

from models.cli import main
from models.config import ModelConfig, TrainConfig
from models.data.transforms import TransformConfig
from models.engine.checkpoint import init_from, load_checkpoint
from models.errors import ConfigError, DataError, NoPseudoMasksError
from models.nets.knet import build_knet
from models.uplvp.pretrain import load_pseudo, pretrain
from models.uplvp.prompts import PromptConfig
from models.uplvp.proposals import propose_folder

SMALL = dict(width=64, num_kernels=20, num_stages=2, gn_groups=16, num_heads=2, ffn_dim=128)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, offline_engine):
    """Three real photos from scikit-image and their offline-engine pseudo masks (COCO JSON)."""
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()).save(d / f"{name}.jpg")
    pseudo = d.parent / "pseudo.json"
    coco = propose_folder(d, offline_engine, pseudo, max_masks=5)
    assert len(coco["annotations"]) >= 6
    return d, pseudo


def _cfgs(epochs: int, **kw) -> tuple[ModelConfig, TrainConfig]:
    return (ModelConfig(num_classes=4, **SMALL),
            TrainConfig(epochs=epochs, batch_size=1, lr=5e-4, warmup_iters=5, grad_clip=1.0, short_side=224,
                        max_long_side=320, seed=0, **kw))


@pytest.mark.parametrize("matching", ["cosine", "fixed"])
def test_pretraining_reduces_the_kernel_supervision_loss(photos, tmp_path, matching):
    images, pseudo = photos
    mcfg, tcfg = _cfgs(epochs=12)
    ds, summary = load_pseudo(pseudo, images, TransformConfig(224, 320))
    assert summary["images"] == 3 and summary["categories"] == ["cat", "dog", "car", "person"]
    torch.manual_seed(0)
    model = build_knet(mcfg)
    backbone_before = [p.clone() for p in model.backbone.parameters()]
    state = pretrain(model, ds, mcfg, tcfg, PromptConfig(matching=matching, num_slots=5, level="p4"),
                     ds.ann.categories.to_coco(), out=tmp_path / "pre.pt")
    first, last = state.history[0]["loss"], state.history[-1]["loss"]
    assert last < 0.7 * first, [round(e["loss"], 3) for e in state.history]
    # the backbone is frozen by default
    assert all(torch.equal(a, b) for a, b in zip(backbone_before, model.backbone.parameters()))
    ckpt = load_checkpoint(tmp_path / "pre.pt")
    assert ckpt["extra"]["pretrain"]["prompts"]["matching"] == matching


def _pretrained(tmp_path, photos) -> str:
    images, pseudo = photos
    out = tmp_path / "pre.pt"
    assert main(["pretrain", "--images", str(images), "--pseudo", str(pseudo), "--epochs", "1", "--batch-size", "1",
                 "--image-size", "160", "--max-size", "224", "--width", "64", "--kernels", "20", "--stages", "2",
                 "--slots", "5", "--out", str(out), "--no-progress"]) == 0
    return str(out)


def test_class_head_transfers_by_name_or_is_reinitialised(tmp_path, photos):
    path = _pretrained(tmp_path, photos)
    src = load_checkpoint(path)["model"]
    key = "net.stages.1.cls_head.3.weight"
    # same names, another order: rows follow the names
    cats = [{"id": 7, "name": n} for n in ["person", "cat", "car", "dog"]]
    model = build_knet(ModelConfig(num_classes=4, **{**SMALL, "gn_groups": 16}))
    report = init_from(model, path, cats)
    assert report["class_head"] == "reordered"
    w = model.state_dict()[key]
    assert torch.equal(w[0], src[key][3]) and torch.equal(w[1], src[key][0]) and torch.equal(w[3], src[key][1])
    # a different vocabulary of the same size: not transferred
    other = [{"id": i, "name": n} for i, n in enumerate(["bolt", "nut", "gear", "spring"])]
    fresh = build_knet(ModelConfig(num_classes=4, **SMALL))
    before = fresh.state_dict()[key].clone()
    report = init_from(fresh, path, other)
    assert report["class_head"].startswith("re-initialised")
    assert torch.equal(fresh.state_dict()[key], before)
    assert torch.equal(fresh.state_dict()["net.init_kernels.weight"], src["net.init_kernels.weight"])


def test_finetune_init_from_pretraining_says_what_happened_to_the_class_head(tmp_path, photos, voc_coco, capsys):
    path = _pretrained(tmp_path, photos)
    ann, images = voc_coco
    assert main(["finetune", "--train-ann", str(ann), "--train-images", str(images), "--init", path,
                 "--epochs", "1", "--image-size", "160", "--max-size", "224", "--width", "64", "--kernels", "20",
                 "--stages", "2", "--out", str(tmp_path / "ft.pt"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "class head re-initialised" in out and "only in dataset" in out
    # pre-training froze the whole backbone; the fine-tuning trains the stages its own settings leave free
    from models.pipeline import FinetuneParams

    pre, ft = load_checkpoint(path), load_checkpoint(tmp_path / "ft.pt")
    assert pre["model_config"].frozen_backbone_stages == 5
    assert ft["model_config"].frozen_backbone_stages == FinetuneParams().frozen_stages < 5
    last = [k for k in ft["model"] if k.startswith("net.backbone.stages.4.") and k.endswith(".weight")]
    assert last and any(not torch.equal(ft["model"][k], pre["model"][k]) for k in last)


def test_pseudo_json_problems_are_reported(tmp_path, photos):
    images, pseudo = photos
    coco = json.loads(pseudo.read_text())
    # some images missing: warned and skipped
    partial = dict(coco, images=coco["images"] + [{"id": 99, "file_name": "gone.jpg", "height": 10, "width": 10}],
                   annotations=coco["annotations"] + [{**coco["annotations"][0], "id": 999, "image_id": 99,
                                                       "segmentation": [[1, 1, 8, 1, 8, 8]], "bbox": [1, 1, 7, 7]}])
    p1 = tmp_path / "p1.json"
    p1.write_text(json.dumps(partial))
    with pytest.warns(UserWarning, match="1 images .* not under .* skipped"):
        ds, summary = load_pseudo(p1, images, TransformConfig(160, 224))
    assert len(ds) == 3 and summary["missing_images"] == 1
    # none of the images there
    with pytest.raises(DataError, match="none of its images"):
        load_pseudo(pseudo, tmp_path, TransformConfig(160, 224))
    # zero masks for every image
    p2 = tmp_path / "p2.json"
    p2.write_text(json.dumps(dict(coco, annotations=[])))
    with pytest.raises(NoPseudoMasksError, match="no pseudo masks at all") as err:
        load_pseudo(p2, images, TransformConfig(160, 224))
    assert err.value.code == "no_pseudo_masks"  # what the job record says (worker.tasks), not a crash


def test_cli_vocabulary_mismatch_and_missing_pseudo(tmp_path, photos, capsys):
    images, pseudo = photos
    base = ["pretrain", "--images", str(images), "--epochs", "1", "--out", str(tmp_path / "x.pt")]
    assert main(base + ["--pseudo", str(pseudo), "--vocab", "bolt,nut"]) == 2
    assert "differs from the categories" in capsys.readouterr().err
    assert main(base + ["--pseudo", str(tmp_path / "none.json")]) == 2
    assert "pseudo-mask file not found" in capsys.readouterr().err
    assert main(base + ["--pseudo", str(pseudo), "--matching", "fixed", "--slots", "80"]) == 2
    assert "num_slots" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_pretraining_refuses_mask_rcnn(photos):
    images, pseudo = photos
    ds, _ = load_pseudo(pseudo, images, TransformConfig(160, 224))
    with pytest.raises(ConfigError, match="K-Net"):
        pretrain(torch.nn.Linear(1, 1), ds, ModelConfig(arch="maskrcnn", num_classes=4), TrainConfig(epochs=1),
                 PromptConfig(), [])
