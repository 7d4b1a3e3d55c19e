"""Proposing over a folder: COCO output, skipped files, resume, the CLI and its errors."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from models.cli import main
from models.data.coco import CocoAnnotations
from models.errors import ConfigError
from models.uplvp.proposals import build_engine, propose, propose_folder
from models.uplvp.proposals.baselines import GridEngine


@pytest.fixture
def folder(tmp_path, chelsea):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    chelsea.save(d / "chelsea.jpg")
    chelsea.resize((200, 133)).save(d / "sub" / "small.png")
    Image.new("RGB", (64, 48)).save(d / "black.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (d / "notes.txt").write_text("not an image, ignored")
    return d


def test_output_is_valid_coco_that_our_reader_and_pycocotools_load(folder, tmp_path, offline_engine):
    out = tmp_path / "pseudo.json"
    coco = propose_folder(folder, offline_engine, out, max_masks=4)
    assert json.loads(out.read_text()) == coco
    assert [s["file_name"] for s in coco["skipped"]] == ["broken.jpg"]
    assert "cannot decode" in coco["skipped"][0]["reason"]
    assert sorted(im["file_name"] for im in coco["images"]) == ["black.png", "chelsea.jpg", "sub/small.png"]
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog", "car", "person"]
    per_image: dict[int, int] = {}
    for a in coco["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        assert a["iscrowd"] == 0 and 0 <= a["score"] <= 1 and a["area"] > 0
    assert max(per_image.values()) <= 4

    api = COCO(str(out))  # pycocotools accepts it
    for ann in api.loadAnns(api.getAnnIds()):
        im = api.imgs[ann["image_id"]]
        m = api.annToMask(ann)
        assert m.shape == (im["height"], im["width"])
        assert int(m.sum()) == ann["area"]
        assert mask_utils.toBbox(ann["segmentation"]).tolist() == pytest.approx(ann["bbox"])
    ours = CocoAnnotations(out, folder)  # and so does the fine-tuning / pre-training reader
    assert len(ours.images) == 3
    assert sum(len(ours.annotations_for(im["id"])) for im in ours.images) == len(coco["annotations"])
    assert not (tmp_path / "pseudo.json.partial.jsonl").exists()


def test_a_stopped_run_resumes_where_it_left_off(folder, tmp_path):
    calls = []

    class Counting(GridEngine):
        def propose(self, image, max_masks):
            calls.append(image.size)
            return super().propose(image, max_masks)

    out = tmp_path / "p.json"
    seen = []
    first = propose_folder(folder, Counting(), out, max_masks=3, should_stop=lambda: len(calls) >= 2,
                           progress=lambda d, t: seen.append((d, t)))
    assert first == {} and not out.exists() and (tmp_path / "p.json.partial.jsonl").exists()
    assert len(calls) == 2 and seen[-1][1] == 4
    coco = propose_folder(folder, Counting(), out, max_masks=3)
    assert len(calls) == 2 + 1  # only the images not done before (the broken one was logged as skipped)
    assert len(coco["images"]) == 3 and len(coco["skipped"]) == 1
    assert len(coco["annotations"]) == 9
    assert sorted(im["id"] for im in coco["images"]) == sorted({a["image_id"] for a in coco["annotations"]})


def test_a_time_limited_run_proposes_a_seeded_sample_and_says_how_many_it_did_not_reach(tmp_path, chelsea):
    """What a budgeted UPLVP job does with a pool too large for its proposals' share of the budget:
    a random sample (not the first files by name) is proposed, written as a normal file, and the
    rest is counted."""
    import time

    d = tmp_path / "pool"
    d.mkdir()
    for i in range(8):
        chelsea.resize((64 + i, 48)).save(d / f"{i:02d}.png")

    class Slow(GridEngine):
        def propose(self, image, max_masks):
            time.sleep(0.25)
            return super().propose(image, max_masks)

    def run(seed: int, name: str) -> dict:
        return propose_folder(d, Slow(), tmp_path / name, max_masks=2, max_seconds=0.4, seed=seed)

    coco = run(0, "a.json")
    reached = [im["file_name"] for im in coco["images"]]
    assert 1 <= len(reached) <= 2 and coco["info"]["images_not_reached"] == 8 - len(reached)
    assert json.loads((tmp_path / "a.json").read_text()) == coco and len(coco["annotations"]) == 2 * len(reached)
    assert not (tmp_path / "a.json.partial.jsonl").exists()
    firsts = {run(seed, f"s{seed}.json")["images"][0]["file_name"] for seed in range(6)}
    assert len(firsts) > 1  # the order is shuffled by the seed, not the folder's sorted order
    assert run(0, "again.json")["images"][0]["file_name"] == reached[0]  # and the same seed gives the same sample
    full = propose_folder(d, GridEngine(), tmp_path / "full.json", max_masks=2)  # no limit: every image
    assert len(full["images"]) == 8 and full["info"]["images_not_reached"] == 0


def test_changed_arguments_start_over(folder, tmp_path):
    out = tmp_path / "p.json"
    propose_folder(folder, GridEngine(), out, max_masks=1, should_stop=lambda: True)
    coco = propose_folder(folder, GridEngine(), out, max_masks=2)  # different K: the partial file is not reused
    assert len(coco["annotations"]) == 6


def test_propose_in_memory(chelsea):
    [(img, masks)] = propose([chelsea], GridEngine(), max_masks=5)
    assert img is chelsea and len(masks) == 5
    with pytest.raises(ConfigError, match="max_masks"):
        propose([chelsea], GridEngine(), max_masks=0)


def test_build_engine_errors_before_any_image(monkeypatch, tmp_path):
    monkeypatch.delenv("UPLVP_CLIP_PRETRAINED", raising=False)
    with pytest.raises(ConfigError, match="unknown proposal engine 'sam'"):
        build_engine("sam", ["cat"])
    with pytest.raises(ConfigError, match="empty vocabulary"):
        build_engine("offline", [])
    with pytest.raises(ConfigError, match="UPLVP_CLIP_PRETRAINED"):
        build_engine("clip", ["cat"])
    with pytest.raises(ConfigError, match="not found|does not exist"):
        build_engine("clip", ["cat"], clip_pretrained=str(tmp_path / "missing.pt"))


def test_cli_propose_writes_coco(folder, tmp_path, capsys):
    out = tmp_path / "cli.json"
    assert main(["propose", "--images", str(folder), "--vocab", "coco", "--engine", "grid", "--max-masks", "2",
                 "--out", str(out), "--no-progress"]) == 0
    coco = json.loads(out.read_text())
    # the grid baseline has no language: one class-agnostic category whatever the vocabulary
    assert [c["name"] for c in coco["categories"]] == ["object"] and len(coco["annotations"]) == 6
    assert "1 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--vocab", " , "], "empty"),
    (["--engine", "magic"], "unknown proposal engine"),
    (["--max-masks", "0"], "--max-masks must be >= 1"),
    (["--engine", "clip", "--clip-pretrained", "/nonexistent/clip.pt"], "nonexistent"),
])
def test_cli_bad_input_is_one_clear_error(folder, tmp_path, capsys, args, message):
    out = tmp_path / "x.json"
    assert main(["propose", "--images", str(folder), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("uplvp propose: error:") and message in err and "\n" not in err
    assert not out.exists() and not (tmp_path / "x.json.partial.jsonl").exists()


def test_cli_missing_folder(tmp_path, capsys):
    assert main(["propose", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "x.json")]) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_masks_are_numpy_bool_at_image_size(chelsea):
    [(_, masks)] = propose([chelsea], GridEngine(), max_masks=2)
    assert all(isinstance(m.mask, np.ndarray) and m.mask.shape == (300, 451) for m in masks)
