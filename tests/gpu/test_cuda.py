"""The engine on CUDA end to end: a short fine-tune, a UPLVP pre-training, segmentation, and CPU/GPU parity
of one checkpoint's masks (issue 17's target: mask IoU >= 0.98). Run by bench/gpu.sh on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.pipeline import FinetuneParams, run_finetune, run_pretrain

TINY = dict(epochs=3, image_size=256, lr=1e-3, warmup_iters=2, width=64, kernels=20, stages=2, val_fraction=0.0,
            device="cuda")


@pytest.fixture(scope="module")
def gpu_model(voc_coco, tmp_path_factory) -> Path:
    ann, images = voc_coco
    res = run_finetune(ann, images, tmp_path_factory.mktemp("gpu"), FinetuneParams(**TINY))
    training = res.metrics["training"]
    assert training["device"]["device"] == "cuda:0" and training["precision"] in ("bf16", "fp16")
    assert training["batch_size"] >= 8  # a GPU's default batch
    return res.artifact


def test_finetune_on_the_gpu_learns(gpu_model: Path) -> None:
    from models.engine.checkpoint import load_checkpoint

    state = load_checkpoint(gpu_model)
    losses = [e["loss"] for e in state["history"]]
    assert all(v.device.type == "cpu" for v in state["model"].values())  # device-neutral artifact
    assert losses[-1] < losses[0]


def test_segment_on_the_gpu_and_parity_with_the_cpu(gpu_model: Path, voc_coco) -> None:
    """Same checkpoint, same photo: every kernel's binarised last-stage mask agrees between the devices
    (IoU over the union of all kernels' masks >= 0.98), and the served instances match in number."""
    from PIL import Image

    from models.data.dataset import collate_images
    from models.data.transforms import preprocess_image
    from models.engine.inference import Predictor

    _, images = voc_coco
    photo = Image.open(images / "voc_0.jpg").convert("RGB")
    cpu, gpu = Predictor(gpu_model, device="cpu"), Predictor(gpu_model, device="cuda")
    assert next(gpu.model.parameters()).is_cuda
    x = collate_images([preprocess_image(photo, cpu.transform)[0]])[0]  # padded as the predictors pad
    with torch.inference_mode():
        a = cpu.model.net(x[None])["stages"][-1]["masks"] > 0
        b = gpu.model.net(x[None].cuda())["stages"][-1]["masks"].cpu() > 0
    iou = (a & b).sum().item() / max(1, (a | b).sum().item())
    assert iou >= 0.98, iou
    on_cpu = cpu.predict_images([photo], 0.3)[0]
    on_gpu = gpu.predict_images([photo], 0.3)[0]
    assert abs(len(on_cpu) - len(on_gpu)) <= 1


def test_pretrain_on_the_gpu(voc_coco, tmp_path: Path) -> None:
    _, images = voc_coco
    res = run_pretrain(images, "bottle,chair,person", tmp_path, FinetuneParams(**{**TINY, "epochs": 2}))
    assert res.metrics["pretrain"]["epochs"] == 2 and res.metrics["pretrain"]["pseudo_masks"] > 0


def test_out_of_memory_is_raised_as_such_and_the_gpu_recovers() -> None:
    from models.engine.device import is_out_of_memory, release_memory

    free, total = torch.cuda.mem_get_info()
    with pytest.raises(Exception) as info:
        torch.empty(int(total * 2), dtype=torch.uint8, device="cuda")  # more than the GPU has
    assert is_out_of_memory(info.value)
    release_memory("cuda")
    assert torch.ones(1, device="cuda").item() == 1.0
