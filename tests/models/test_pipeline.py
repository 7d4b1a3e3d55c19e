"""models.pipeline: split, resumable fine-tune, segmentation with the LRU predictor cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.errors import ConfigError, DataError
from models.pipeline import (
    FinetuneParams,
    PipelineHooks,
    PredictorCache,
    run_finetune,
    segment,
    split_train_val,
)

TINY = dict(epochs=1, image_size=96, max_size=128, batch_size=1, warmup_iters=2, lr=1e-3, width=32, kernels=20,
            stages=1, backbone_weights="none", val_fraction=0.0)


@pytest.fixture(scope="module")
def voc4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from models.data.demo import write_voc_demo

    return write_voc_demo(tmp_path_factory.mktemp("voc4"), copies=4)


def test_split_is_deterministic_and_keeps_categories(voc4: tuple[Path, Path], tmp_path: Path) -> None:
    ann, _ = voc4
    tr, va = split_train_val(ann, 0.25, 3, tmp_path / "a")
    _, va2 = split_train_val(ann, 0.25, 3, tmp_path / "b")
    assert va is not None and json.loads(va.read_text()) == json.loads(va2.read_text())
    t, v = json.loads(tr.read_text()), json.loads(va.read_text())
    assert len(t["images"]) == 3 and len(v["images"]) == 1 and t["categories"] == v["categories"]
    assert split_train_val(ann, 0.0, 0, tmp_path / "c") == (ann, None)


def test_resume_continues_from_the_work_dir(voc4: tuple[Path, Path], tmp_path: Path) -> None:
    ann, images = voc4
    stages: list[str] = []
    first = run_finetune(ann, images, tmp_path, FinetuneParams(**TINY), hooks=PipelineHooks(on_stage=stages.append))
    assert stages == ["validating", "finetuning", "evaluating"] and first.metrics["evaluated_on"] == "train"
    steps: list[tuple] = []
    second = run_finetune(ann, images, tmp_path, FinetuneParams(**{**TINY, "epochs": 2}),
                          hooks=PipelineHooks(on_step=lambda *a: steps.append(a)))
    assert [h["epoch"] for h in second.history] == [1, 2] and second.history[0] == first.history[0]
    assert all("AP50" in h for h in second.history)  # a small val set: evaluated every epoch (the curves' AP)
    assert {s[0] for s in steps} == {1}  # only epoch 2 was trained

    cache = PredictorCache(capacity=1)
    out = segment(cache.get(second.artifact), [("a.jpg", (images / "voc_0.jpg").read_bytes())], 0.0, "json")
    assert out[0]["width"] == 500 and out[0]["instances"]
    with pytest.raises(DataError, match="b.jpg: cannot decode"):
        segment(cache.get(second.artifact), [("b.jpg", b"nope")], 0.0, "json")
    located: list[str] = []
    key = ("artifact", "sha-of-a-replaced-file")
    cache.get(key, lambda: located.append("x") or second.artifact)  # a new key: located, loaded, the old one evicted
    cache.get(key, lambda: located.append("y") or second.artifact)  # a hit: not located again
    assert len(cache) == 1 and cache.keys() == [key] and located == ["x"]


def test_exif_orientation_is_applied_the_same_in_training_and_serving(tmp_path: Path) -> None:
    """A phone photo stored sideways with EXIF orientation 6: training (load_image) and the service
    (decode_image) both see it upright, so masks learnt on one line up with the other."""
    import io

    import numpy as np
    from PIL import Image

    from models.data.coco import decode_image, load_image

    stored = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif.tobytes())
    (tmp_path / "phone.jpg").write_bytes(buf.getvalue())
    trained_on, served = load_image(tmp_path / "phone.jpg"), decode_image(buf.getvalue(), "phone.jpg")
    assert trained_on.size == served.size == (40, 60)
    assert np.array_equal(np.asarray(trained_on), np.asarray(served))


def test_kernels_follow_the_data_and_never_cap_it_silently():
    from models.errors import ConfigError
    from models.pipeline import auto_steps, kernels_for

    assert kernels_for(3) == 50 and kernels_for(329) == 420  # 1.25 x 329, rounded up to 10
    cfg = FinetuneParams().model_config(num_classes=1, max_instances=329)
    assert cfg.num_kernels == 420 and cfg.max_per_image >= 420  # every kernel's mask can be returned
    with pytest.raises(ConfigError, match="at least 329"):
        FinetuneParams(kernels=50).model_config(num_classes=1, max_instances=329)
    assert auto_steps(100) == 1500 and auto_steps(10) == 600 and auto_steps(10_000) == 4000


def test_a_budget_below_the_minimum_is_refused():
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 1.0"):
        FinetuneParams(time_budget_min=0.5).validate()
    tcfg = FinetuneParams(time_budget_min=2).train_config(100)
    assert tcfg.time_budget_s == 120 and tcfg.epochs >= 1000  # epochs only cap a budgeted run
    assert FinetuneParams().train_config(100).epochs == 30  # no budget, no epochs: 1500 steps of 50


def _sized(images: list[tuple[int, int]], sides: list[list[float]]) -> object:
    """A stand-in for CocoAnnotations: images (h, w), and per image its instances' sides in pixels."""
    from types import SimpleNamespace

    ims = [{"id": i, "height": h, "width": w} for i, (h, w) in enumerate(images)]
    anns = {i: [{"area": s * s, "iscrowd": 0} for s in ss] for i, ss in enumerate(sides)}
    return SimpleNamespace(images=ims, annotations_for=lambda i: anns[i])


def test_image_size_follows_the_size_of_the_objects():
    from models.pipeline import image_size_for

    assert image_size_for(_sized([(600, 800)], [[200.0, 300.0]])) == 320  # large objects: the floor
    # nuclei of ~13 px on 260-px tiles: 32 px wants 640, twice the tile is 520
    assert image_size_for(_sized([(260, 260)] * 3, [[13.0, 14.0]] * 3)) == 520
    # lesions of ~25 px on 416-px photos: 32 / (25 / 416) = 532 -> 544
    assert image_size_for(_sized([(416, 1000)], [[25.0, 24.0, 26.0]])) == 544
    # tiny insects: 32 / (7.5 / 576) = 2458 -> the cap; trained on CROP_PX windows, evaluated whole
    assert image_size_for(_sized([(576, 768)], [[6.0, 9.0]])) == 1024
    assert FinetuneParams().with_size(1024).transform(True).crop == 640
    assert FinetuneParams().with_size(1024).transform(False).crop == 0
    assert FinetuneParams().with_size(544).transform(True).crop == 0  # at most CROP_PX: whole images
    assert FinetuneParams(crop=-1).with_size(1024).transform(True).crop == 0
    assert FinetuneParams(crop=256).with_size(544).transform(True).crop == 256
    assert image_size_for(_sized([(576, 768)], [[]])) == 320  # no instance: nothing to follow


def test_image_size_zero_is_resolved_from_the_training_set(voc4: tuple[Path, Path], tmp_path: Path):
    from models.pipeline import image_size_for, long_side_for

    ann, images = voc4
    res = run_finetune(ann, images, tmp_path / "run", FinetuneParams(**{**TINY, "image_size": 0, "max_size": 0}),
                       export=False)
    from models.data.coco import CocoAnnotations

    size = image_size_for(CocoAnnotations(ann, images))
    assert res.params["image_size"] == size and res.params["max_size"] == long_side_for(size)
    from models.engine.checkpoint import load_checkpoint

    tcfg = load_checkpoint(res.artifact)["train_config"]  # what the model trained (and will serve) at
    assert (tcfg.short_side, tcfg.max_long_side) == (size, long_side_for(size))


def test_imagenet_class_evidence_is_on_where_there_are_classes_to_tell_apart():
    assert FinetuneParams().model_config(num_classes=7).class_from_backbone
    assert not FinetuneParams().model_config(num_classes=1).class_from_backbone
    assert FinetuneParams(class_from_backbone=True).model_config(num_classes=1).class_from_backbone


def test_self_training_pre_trains_on_a_teacher_fine_tuned_on_the_labels(voc4: tuple[Path, Path], tmp_path: Path):
    from models.uplvp.proposals.self_training import SelfEngine
    from PIL import Image

    ann, images = voc4
    params = FinetuneParams(**{**TINY, "epochs": 2, "val_fraction": 0.25, "pretrain": True, "pretrain_epochs": 1,
                               "proposal_engine": "self", "self_min_score": 0.0, "max_masks": 3,
                               "student_from_teacher": True, "self_min_pseudo_per_label": 0.0})
    stages: list[str] = []
    res = run_finetune(ann, images, tmp_path, params, hooks=PipelineHooks(on_stage=stages.append))
    # the teacher's own fine-tuning shows as one stage, before the UPLVP ones
    assert stages == ["validating", "teaching", "proposing", "pretraining", "finetuning", "evaluating"]
    teacher = tmp_path / "teacher" / "model.pt"
    assert teacher.is_file() and res.init_report is not None and res.init_report["loaded"]
    names = [c["name"] for c in json.loads(ann.read_text())["categories"]]
    pseudo = json.loads((tmp_path / "pretrain" / "pseudo.json").read_text())
    assert pseudo["info"]["engine"] == "self" and [c["name"] for c in pseudo["categories"]] == names
    per_image: dict[int, int] = {}
    for a in pseudo["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert pseudo["annotations"] and max(per_image.values()) <= 3
    # the job's result says what the proposals made (the pool is the labelled folder: 4 photos)
    uplvp = dict(res.metrics["training"]["uplvp"])
    assert uplvp.pop("minutes_before_finetuning") > 0
    assert uplvp.pop("self_min_score") == {"min_score": 0.0, "calibrated": False}  # given, not calibrated
    assert uplvp.pop("pretraining_skipped") is None
    assert uplvp == {"engine": "self", "pseudo_masks": len(pseudo["annotations"]), "images_proposed": 4,
                     "pool_images": 4}
    # asked to, the student's pre-training starts from the teacher's weights (all of them fit), not ImageNet alone
    from models.engine.checkpoint import load_checkpoint

    pre = load_checkpoint(tmp_path / "pretrain" / "pretrain.pt")
    started = pre["extra"]["pretrain"]["started_from"]
    assert started["checkpoint"] == str(teacher) and started["loaded"] > 0 and started["not_loaded"] == 0
    assert started["class_head"] == "transferred"
    # pre-training freezes the backbone, so it is still the teacher's, which its fine-tuning moved away from the
    # initialisation the pre-training would otherwise have started from
    import torch

    from models.nets.build import build_model

    taught = load_checkpoint(teacher)["model"]
    torch.manual_seed(params.seed)
    fresh = build_model(pre["model_config"], 96, 128).state_dict()
    backbone = [k for k in taught if k.startswith("net.backbone.") and taught[k].is_floating_point()]
    assert backbone and all(torch.equal(pre["model"][k], taught[k]) for k in backbone)
    assert any(not torch.equal(fresh[k], taught[k]) for k in backbone)

    # asked to (self_min_score None), the cut is calibrated on the held-out images (here the labelled four), once:
    # a resumed job reads it
    from models.pipeline import teacher_min_score

    calibrated = FinetuneParams(**{**TINY, "self_min_score": None})
    cut = teacher_min_score(teacher, ann, images, calibrated)
    assert 0.0 <= cut["min_score"] <= 1.0 and cut["images"] == 4 and cut["instances"] > 0
    assert json.loads((teacher.parent / "min_score.json").read_text()) == cut
    assert teacher_min_score(teacher, ann, images, calibrated) == cut
    assert teacher_min_score(teacher, ann, images, FinetuneParams(**TINY)) == {"min_score": 0.5, "calibrated": False}

    engine = SelfEngine(teacher, min_score=0.0)
    photo = Image.open(images / "voc_0.jpg").convert("RGB")
    props = engine.propose(photo, 2)
    assert 1 <= len(props) <= 2 and engine.vocabulary == names
    assert all(p.mask.shape == (photo.height, photo.width) and p.mask.any() and p.category in names for p in props)
    assert [p.score for p in props] == sorted((p.score for p in props), reverse=True)
    assert engine.propose(photo, 5) and all(p.score >= 0.99 for p in SelfEngine(teacher, 0.99).propose(photo, 5))

    with pytest.raises(ConfigError, match="held-out images"):
        run_finetune(ann, images, tmp_path / "b", FinetuneParams(**{**TINY, "pretrain": True,
                                                                      "proposal_engine": "self"}))


def test_self_training_with_fewer_pseudo_masks_than_labels_fine_tunes_on_from_its_teacher(voc4, tmp_path: Path):
    """A teacher that keeps fewer masks on the pool than the labels hold has nothing to pre-train on that it did
    not learn from the labels: the job skips the pre-training, says so, and fine-tunes on from the teacher."""
    from models.engine.checkpoint import load_checkpoint
    from models.pipeline import too_few_pseudo_masks

    ann, images = voc4
    # every one of the teacher's masks is kept (cut 0), at most one per photo of the four: fewer than
    # 2 x the three training photos' instances
    params = FinetuneParams(**{**TINY, "epochs": 2, "val_fraction": 0.25, "pretrain": True, "proposal_engine": "self",
                               "self_min_score": 0.0, "max_masks": 1, "self_min_pseudo_per_label": 2.0})
    stages: list[str] = []
    res = run_finetune(ann, images, tmp_path, params, hooks=PipelineHooks(on_stage=stages.append))
    assert stages == ["validating", "teaching", "proposing", "finetuning", "evaluating"]
    assert not (tmp_path / "pretrain" / "pretrain.pt").exists()
    pseudo = json.loads((tmp_path / "pretrain" / "pseudo.json").read_text())
    uplvp = res.metrics["training"]["uplvp"]
    labelled = len(json.loads((tmp_path / "split" / "train.json").read_text())["annotations"])
    found = len(pseudo["annotations"])
    assert uplvp["pseudo_masks"] == found and 0 < found <= 4 < 2 * labelled
    assert uplvp["pretraining_skipped"] == {"pseudo_masks": found, "labelled_instances": labelled, "per_label": 2.0,
                                            "instead": "fine-tuned on from the teacher"}
    # the fine-tuning started from every one of the teacher's tensors
    teacher = load_checkpoint(tmp_path / "teacher" / "model.pt")
    assert res.init_report["loaded"] and not res.init_report["reinitialised"] and not res.init_report["missing"]
    assert len(res.init_report["loaded"]) == len(teacher["model"])
    # the rule itself: at the line the pre-training runs; no mask at all is not a reason to skip (that job fails
    # with no_pseudo_masks, as for every engine)
    assert too_few_pseudo_masks(6, 3, 2.0) is None and too_few_pseudo_masks(6, 3, 0.0) is None
    assert too_few_pseudo_masks(6, 4, 2.0)["pseudo_masks"] == 6
    assert too_few_pseudo_masks(0, 4, 2.0) is None
    with pytest.raises(ConfigError, match="self_min_pseudo_per_label"):
        FinetuneParams(self_min_pseudo_per_label=-1).validate()


def test_a_budgeted_uplvp_job_shares_one_budget():
    from models.pipeline import MAX_BUDGET_EPOCHS, PRETRAIN_SHARE

    budgeted = FinetuneParams(time_budget_min=10, pretrain=True).pretrain_config()
    assert budgeted.time_budget_s == 600 * PRETRAIN_SHARE and budgeted.epochs == MAX_BUDGET_EPOCHS
    assert FinetuneParams(time_budget_min=10, pretrain=True, pretrain_epochs=3).pretrain_config().epochs == 3
    unbudgeted = FinetuneParams(epochs=5, pretrain=True).pretrain_config()
    assert unbudgeted.time_budget_s == 0 and unbudgeted.epochs == 5
    # pre-training done once, outside any fine-tuning's budget, has a budget of its own
    own = FinetuneParams(time_budget_min=10, pretrain=True).pretrain_config(budget_min=4)
    assert own.time_budget_s == 240 and own.epochs == MAX_BUDGET_EPOCHS
    assert FinetuneParams(epochs=5, pretrain=True).pretrain_config(budget_min=2).time_budget_s == 120


def test_a_budgeted_uplvp_job_gives_its_proposals_a_share_of_the_budget(monkeypatch, tmp_path: Path, voc4):
    """A pool of a thousand photos at ~1 image/s must not eat a 15-minute budget: inside a job the
    proposals get PROPOSAL_SHARE of it (a seeded sample of the pool); pre-training done once on its
    own budget proposes on all of it."""
    import models.uplvp.proposals as proposals
    from models.pipeline import PROPOSAL_SHARE, run_uplvp_pretraining

    calls: list[dict] = []

    class Stop(Exception):
        pass

    def fake_propose_folder(*args, **kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(proposals, "propose_folder", fake_propose_folder)
    _, images = voc4
    params = FinetuneParams(time_budget_min=10, pretrain=True, proposal_engine="grid", seed=3)
    with pytest.raises(Stop):
        run_uplvp_pretraining(images, ["cat"], tmp_path / "a", params)
    with pytest.raises(Stop):
        run_uplvp_pretraining(images, ["cat"], tmp_path / "b", params, budget_min=5)
    assert [(c["max_seconds"], c["seed"]) for c in calls] == [(600 * PROPOSAL_SHARE, 3), (0.0, 3)]


def test_predictor_cache_on_a_gpu_stops_where_memory_does(tmp_path: Path) -> None:
    """The LRU is bounded by the device's memory as well as by its capacity: before a model loads, least
    recently used ones go until a quarter of the GPU is free (here a fake GPU's free/total figures)."""
    from models.config import ModelConfig, TrainConfig
    from models.engine.checkpoint import save_checkpoint
    from models.nets.build import build_model

    cfg = ModelConfig(num_classes=1, backbone_weights="none", width=32, num_kernels=8, num_stages=1, gn_groups=8)
    paths = [save_checkpoint(tmp_path / f"m{i}.pt", build_model(cfg), cfg, TrainConfig(), [{"id": 1, "name": "a"}],
                             []) for i in range(3)]
    free = {"bytes": 100}
    cache = PredictorCache(capacity=3, free_bytes=lambda: free["bytes"], total_bytes=lambda: 100)
    cache.get(paths[0])
    cache.get(paths[1])
    assert cache.keys() == paths[:2]  # plenty free: both stay
    free["bytes"] = 10  # the GPU filled up: loading a third drops models until 25 % is free, or none is left
    cache.get(paths[2])
    assert cache.keys() == [paths[2]]
    free["bytes"] = 30
    cache.get(paths[0])
    assert cache.keys() == [paths[2], paths[0]]
    cpu = PredictorCache(capacity=2)  # the CPU has no such figures: capacity alone bounds it
    assert cpu._total() is None and cpu.onnx_ok
