"""Inference benchmark: end to end (a PIL image in, instances with full-size masks out), one process,
2 threads, every arm on the same photos in the same run.

Arms:
  knet_eager   uplvp K-Net under PyTorch (models.engine.inference.Predictor: what the service runs today)
  knet_ort     the same checkpoint exported to ONNX (models.engine.export), ONNX Runtime + client/onnx_model.py
  knet_int8    that graph with ONNX Runtime's dynamic int8 quantization (weights int8, activations quantized
               per batch)
  yolo_ort     Ultralytics YOLOv8n-seg exported to ONNX by Ultralytics, run by Ultralytics' predictor on
               ONNX Runtime (its own pre- and post-processing, NMS included); `make bench-deps`
  maskrcnn     Mask R-CNN on our backbone under PyTorch (Predictor)

Sizes: the model's input at 384x512 (short side 384, long side 512: photos of 3:4) and 640x640, batch 1
and 8. The photos are the ones scikit-image ships, resized to the input size, so every arm resizes nothing
of note and does all its own pre- and post-processing. Latency: the median of `--repeats` timed calls
after two warm-up calls, per image (a batch of 8 divides by 8).

Weights: `--knet` / `--maskrcnn` checkpoints and `--yolo` weights to time trained models (post-processing
depends on how many instances pass the score threshold); without them, K-Net and Mask R-CNN are the recipe's
architecture with ImageNet backbones and untrained heads, and YOLO is yolov8n-seg.yaml untrained.

`--ap DATASET_DIR` also scores knet_eager, knet_ort and knet_int8 on DATASET_DIR's test split (COCO:
annotations/test.json and images/) with pycocotools: ONNX Runtime must not move mask AP by more than
0.5 points, int8 by more than 1 (issue 16).

    .venv/bin/python bench/inference.py --knet ckpt.pt --maskrcnn mrcnn.pt --yolo best.pt --ap data/balloon
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, machine  # noqa: E402

SIZES = {"384x512": (384, 512), "640x640": (640, 640)}
BATCHES = (1, 8)
SCORE = 0.3


def photos(size: tuple[int, int], n: int) -> list[Any]:
    """n photos that scikit-image ships, resized to (h, w)."""
    from PIL import Image
    from skimage import data

    arrays = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket(), data.cat(), data.immunohistochemistry()]
    return [Image.fromarray(arrays[i % len(arrays)]).convert("RGB").resize((size[1], size[0])) for i in range(n)]


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `repeats` calls of fn after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def knet_checkpoint(path: str | None, work: Path, arch: str = "knet") -> Path:
    """The given checkpoint, or the recipe's architecture with an ImageNet backbone and untrained heads."""
    if path:
        return Path(path)
    from models.engine.checkpoint import save_checkpoint
    from models.nets.build import build_model
    from models.pipeline import FinetuneParams

    params = FinetuneParams(arch=arch, image_size=384, max_size=512)
    cfg = params.model_config(1, 1)
    model = build_model(cfg, 384, 512)
    out = work / f"{arch}.pt"
    save_checkpoint(out, model, cfg, params.train_config(1), [{"id": 1, "name": "object"}], [])
    return out


def at_size(predictor: Any, size: tuple[int, int]) -> Any:
    """A Predictor (or OnnxSegmenter) set to resize photos to `size` (short side, long side cap)."""
    short, long = min(size), max(size)
    if hasattr(predictor, "transform"):
        predictor.transform.short_side, predictor.transform.max_long_side = short, long
    else:
        predictor.meta["short_side"], predictor.meta["max_long_side"] = short, long
    return predictor


def quantize(src: Path, dest: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8)
    import onnx

    # OnnxSegmenter reads the model's settings from the "uplvp" metadata: carry it over if quantizing dropped it
    m = onnx.load(str(dest))
    if not any(p.key == "uplvp" for p in m.metadata_props):
        for p in onnx.load(str(src)).metadata_props:
            m.metadata_props.add(key=p.key, value=p.value)
        onnx.save(m, str(dest))
    return dest


def build_arms(args: argparse.Namespace, work: Path, threads: int) -> dict[str, Callable[[tuple[int, int]], Any]]:
    """Arm name -> a function of the input size returning predict(images) -> instances per image."""
    from client.onnx_model import OnnxSegmenter
    from models.engine.export import export_onnx
    from models.engine.inference import Predictor

    knet = knet_checkpoint(args.knet, work)
    onnx_path = work / "knet.onnx"
    export_onnx(knet, onnx_path)
    int8_path = quantize(onnx_path, work / "knet_int8.onnx")
    arms: dict[str, Callable[[tuple[int, int]], Any]] = {
        "knet_eager": lambda size: at_size(Predictor(knet, threads), size).predict_images,
        "knet_ort": lambda size: at_size(OnnxSegmenter(onnx_path, threads), size).predict,
        "knet_int8": lambda size: at_size(OnnxSegmenter(int8_path, threads), size).predict,
        "maskrcnn": lambda size: _maskrcnn(args, work, threads, size),
    }
    if not args.no_yolo:
        arms["yolo_ort"] = lambda size: _yolo(args, work, size)
    return {a: make for a, make in arms.items() if not args.arms or a in args.arms}


def _maskrcnn(args: argparse.Namespace, work: Path, threads: int, size: tuple[int, int]) -> Any:
    from models.engine.inference import Predictor

    p = Predictor(knet_checkpoint(args.maskrcnn, work, "maskrcnn"), threads)
    net = p.model.net if hasattr(p.model, "net") else p.model
    if hasattr(net, "transform"):  # torchvision resizes inside the model too: keep it at the benchmark size
        net.transform.min_size, net.transform.max_size = (min(size),), max(size)
    return at_size(p, size).predict_images


def _yolo(args: argparse.Namespace, work: Path, size: tuple[int, int]) -> Any:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    model = YOLO(args.yolo or "yolov8n-seg.yaml", task="segment")
    path = model.export(format="onnx", imgsz=list(size), dynamic=True, simplify=False, batch=8,
                        project=str(work), name=f"yolo_{size[0]}x{size[1]}")
    ort_model = YOLO(path, task="segment")

    def predict(images: list[Any]) -> list[Any]:
        # retina_masks: masks at the photo's size, as the other arms give them
        return ort_model.predict(images, imgsz=list(size), conf=SCORE, retina_masks=True, verbose=False,
                                 batch=len(images))
    return predict


def latency(args: argparse.Namespace, work: Path, threads: int) -> list[dict[str, Any]]:
    rows = []
    arms = build_arms(args, work, threads)
    for size_name, size in SIZES.items():
        if args.sizes and size_name not in args.sizes:
            continue
        for arm, make in arms.items():
            predict = make(size)
            for batch in args.batches:
                images = photos(size, batch)
                repeats = args.repeats if batch == 1 else max(3, args.repeats // 4)
                kwargs = {} if arm == "yolo_ort" else {"score_threshold": SCORE}
                if arm != "yolo_ort":
                    kwargs["batch_size"] = batch
                s = timed(lambda: predict(images, **kwargs), repeats)
                rows.append({"arm": arm, "size": size_name, "batch": batch, "ms_per_image": 1000 * s / batch,
                             "ms_per_call": 1000 * s, "repeats": repeats})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def ap_check(args: argparse.Namespace, work: Path, threads: int) -> dict[str, Any]:
    """Mask AP on the test split of args.ap for the checkpoint under PyTorch, ONNX Runtime fp32 and int8."""
    from PIL import Image

    from client.onnx_model import OnnxSegmenter
    from models.data.coco import CocoAnnotations
    from models.data.masks import encode_rle
    from models.engine.evaluate import evaluate_segm
    from models.engine.inference import Predictor

    root = Path(args.ap)
    ann = CocoAnnotations(root / "annotations" / "test.json", root / "images")
    images = ann.images
    pil = [Image.open(root / "images" / im["file_name"]).convert("RGB") for im in images]
    out: dict[str, Any] = {"dataset": root.name, "images": len(images)}
    arms = {"knet_eager": Predictor(args.knet, threads).predict_images,
            "knet_ort": OnnxSegmenter(work / "knet.onnx", threads).predict,
            "knet_int8": OnnxSegmenter(work / "knet_int8.onnx", threads).predict}
    for arm, predict in arms.items():
        results = []
        for im, photo in zip(images, pil):
            for inst in predict([photo], score_threshold=0.05)[0]:
                seg = inst["segmentation"] if "segmentation" in inst else encode_rle(inst["mask"])
                results.append({"image_id": int(im["id"]), "category_id": inst["category_id"], "segmentation": seg,
                                "score": inst["score"]})
        m = evaluate_segm(ann.raw, results, [int(im["id"]) for im in images])
        out[arm] = {k: m["segm"][k] for k in ("AP", "AP50", "AP75")}
        print(arm, out[arm], flush=True)
    return out


def report(res: dict[str, Any]) -> str:
    rows = res["latency"]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    lines = ["# Inference benchmark (bench/inference.py)", "",
             f"Machine: {res['machine']['cpu']} ({res['machine']['isa']}), {res['threads']} threads, torch "
             f"{res['machine']['torch']}, onnxruntime {res['onnxruntime']}, commit {res['machine']['commit']}. "
             f"End to end: a PIL photo in, instances with full-size masks out (score >= {SCORE}); median "
             "ms per image.", "", f"Weights: {res['weights']}", "",
             "| arm | " + " | ".join(f"{s} b{b}" for s in sizes for b in batches) + " |",
             "|---|" + "---|" * (len(sizes) * len(batches))]
    for arm in arms:
        cells = []
        for s in sizes:
            for b in batches:
                r = next((r for r in rows if r["arm"] == arm and r["size"] == s and r["batch"] == b), None)
                cells.append(f"{r['ms_per_image']:.0f}" if r else "–")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    y = next((r for r in rows if r["arm"] == "yolo_ort" and r["size"] == "384x512" and r["batch"] == 1), None)
    if y is not None:
        lines += ["", "uplvp against YOLOv8n-seg (ONNX Runtime) at 384x512, batch 1 (target <= 0.8x):"]
        for arm in ("knet_eager", "knet_ort", "knet_int8"):
            r = next((r for r in rows if r["arm"] == arm and r["size"] == "384x512" and r["batch"] == 1), None)
            if r is None:
                continue
            lines.append(f"- {arm}: {r['ms_per_image']:.0f} ms vs {y['ms_per_image']:.0f} ms "
                         f"({r['ms_per_image'] / y['ms_per_image']:.2f}x)")
    if res.get("ap"):
        a = res["ap"]
        lines += ["", f"Mask AP on {a['dataset']} test ({a['images']} images), the same checkpoint (%):", "",
                  "| arm | AP | AP50 | AP75 |", "|---|---|---|---|"]
        for arm in ("knet_eager", "knet_ort", "knet_int8"):
            lines.append(f"| {arm} | " + " | ".join(f"{100 * a[arm][k]:.1f}" for k in ("AP", "AP50", "AP75")) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--knet", help="a K-Net checkpoint (default: the recipe's architecture, untrained heads)")
    p.add_argument("--maskrcnn", help="a Mask R-CNN checkpoint (default: untrained heads)")
    p.add_argument("--yolo", help="YOLOv8n-seg weights (.pt; default: yolov8n-seg.yaml untrained)")
    p.add_argument("--no-yolo", action="store_true")
    p.add_argument("--ap", help="a COCO dataset folder: score the K-Net arms on its test split (needs --knet)")
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--arms", nargs="+", help="only these arms (default: all)")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), help="only these input sizes (default: all)")
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="batch sizes (default: 1 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="inference", help="results file name under bench/results")
    args = p.parse_args()
    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        res = {"machine": machine(), "threads": args.threads, "onnxruntime": onnxruntime.__version__,
               "weights": {"knet": args.knet or "untrained heads", "maskrcnn": args.maskrcnn or "untrained heads",
                           "yolo": args.yolo or ("untrained" if not args.no_yolo else "not run")},
               "latency": latency(args, work, args.threads)}
        if args.ap:
            res["ap"] = ap_check(args, work, args.threads)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    (RESULTS / f"{args.name}.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
