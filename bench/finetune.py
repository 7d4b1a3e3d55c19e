"""Fine-tuning benchmark: K-Net vs Mask R-CNN, same backbone, data, epochs, image size and metric.

Train on ../shared/data/coco128 (128 images), validate on coco_mini_train (80 disjoint
images) after every epoch. Each arm runs in its own process so its peak RSS is its own.
Writes bench/results/finetune_<arch>.json, finetune.json, finetune.md, finetune_curves.png.

    python bench/finetune.py                      # both arms, defaults below
    python bench/finetune.py --arms knet --epochs 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, ROOT, machine, peak_rss_mb, require_data  # noqa: E402


def checkpoint_path(arm: str) -> Path:
    return ROOT / "runs" / "bench" / f"finetune_{arm}.pt"


def latency(ckpt: Path, image_paths: list[Path], threads: int = 2) -> dict:
    """Per-image latency (batch 1, `threads` torch threads) of the user-facing inference path."""
    import torch

    from models.data.coco import load_image
    from models.engine.inference import Predictor

    torch.set_num_threads(threads)
    pred = Predictor(ckpt)
    images = [load_image(p) for p in image_paths]
    pred.predict_images(images[:2], batch_size=1)  # warm-up (allocations, kernel selection)
    total, forward = [], []
    for img in images:
        t0 = time.perf_counter()
        pred.predict_images([img], batch_size=1)
        total.append((time.perf_counter() - t0) * 1000)
    # model forward alone, at the same sizes
    from models.data.dataset import collate_images
    from models.data.transforms import preprocess_image

    with torch.inference_mode():
        for img in images:
            x, size = preprocess_image(img, pred.transform)
            batch = collate_images([x]).contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            pred.model.detect(batch, [size])
            forward.append((time.perf_counter() - t0) * 1000)

    def q(v: list[float], p: float) -> float:
        return statistics.quantiles(v, n=100)[int(p) - 1] if len(v) > 1 else v[0]

    return {
        "images": len(images), "threads": threads,
        "end_to_end_ms_p50": statistics.median(total), "end_to_end_ms_p90": q(total, 90),
        "forward_ms_p50": statistics.median(forward), "forward_ms_p90": q(forward, 90),
    }


def run_arm(args: argparse.Namespace) -> None:
    import torch

    from models.config import ModelConfig, TrainConfig
    from models.data.coco import CocoAnnotations
    from models.data.dataset import CocoDataset
    from models.data.transforms import TransformConfig
    from models.engine.inference import evaluate_model
    from models.engine.train import TrainHooks, train
    from models.nets.build import build_model

    torch.set_num_threads(args.threads)
    data = require_data()
    train_ann = CocoAnnotations(data / "coco128/annotations/instances_val2017.json", data / "coco128/val2017")
    cats = train_ann.categories
    val_ann = CocoAnnotations(data / "coco_mini_train/annotations/instances_train2017.json",
                              data / "coco_mini_train/train2017", categories=cats)
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       short_side=args.image_size, max_long_side=args.max_size, num_threads=args.threads,
                       warmup_iters=args.warmup_iters)
    mcfg = ModelConfig(arch=args.arm, num_classes=len(cats))
    transform = TransformConfig(tcfg.short_side, tcfg.max_long_side)
    train_set = CocoDataset(train_ann, transform, train=True)
    val_set = CocoDataset(val_ann, TransformConfig(tcfg.short_side, tcfg.max_long_side, flip_prob=0.0), train=False)
    torch.manual_seed(args.seed)
    model = build_model(mcfg, tcfg.short_side, tcfg.max_long_side)
    n_params = sum(p.numel() for p in model.parameters())
    eval_times: list[float] = []
    evaluations: list[dict] = []  # the last one (after the final epoch) is the final result

    def evaluate(m: torch.nn.Module) -> dict:
        t0 = time.perf_counter()
        metrics = evaluate_model(m, val_ann, val_set, batch_size=2, mask_threshold=mcfg.mask_threshold)
        eval_times.append(time.perf_counter() - t0)
        evaluations.append(metrics)
        return metrics

    def on_epoch(e: dict) -> None:
        print(f"[{args.arm}] epoch {e['epoch']}: loss {e['loss']:.3f} AP {e.get('AP', float('nan')):.4f} "
              f"AP50 {e.get('AP50', float('nan')):.4f} agnostic AP {e.get('agnostic_AP', float('nan')):.4f} "
              f"{e['images_per_s']:.2f} img/s", flush=True)

    ckpt = checkpoint_path(args.arm)
    resume = None
    if args.resume and ckpt.exists():
        from models.engine.checkpoint import load_checkpoint

        # per-epoch seeding makes the continuation identical to an uninterrupted run
        resume = load_checkpoint(ckpt)
        print(f"[{args.arm}] resuming after epoch {resume['epoch']}", flush=True)
    state = train(model, train_set, mcfg, tcfg, cats.to_coco(), out=ckpt, evaluate=evaluate, resume=resume,
                  hooks=TrainHooks(on_epoch=on_epoch, progress=False))
    rss = peak_rss_mb()
    final = evaluations[-1]  # train() always evaluates after the last epoch
    val_paths = [val_ann.image_path(im) for im in val_ann.images[: args.latency_images]]
    lat = latency(ckpt, val_paths, threads=args.threads)
    result = {
        "arch": args.arm,
        "train": {"dataset": "coco128", "images": len(train_set), "epochs": args.epochs,
                  "batch_size": args.batch_size, "short_side": args.image_size, "max_long_side": args.max_size,
                  "lr": args.lr, "seed": args.seed},
        "val": {"dataset": "coco_mini_train", "images": len(val_ann.images)},
        "history": state.history,
        "final": final,
        "train_wall_s": sum(e["train_time_s"] for e in state.history),
        "resumed_after_epoch": resume["epoch"] if resume else None,
        "train_images_per_s": statistics.mean(e["images_per_s"] for e in state.history),
        "peak_rss_mb": rss,
        "latency": lat,
        "params_m": n_params / 1e6,
        "checkpoint_mb": ckpt.stat().st_size / 2**20,
        "weights_mb": sum(p.numel() * p.element_size() for p in model.state_dict().values()) / 2**20,
        "machine": machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"finetune_{args.arm}.json").write_text(json.dumps(result, indent=2))
    print(f"[{args.arm}] done: AP {final['segm']['AP']:.4f} AP50 {final['segm']['AP50']:.4f}; "
          f"latency p50 {lat['end_to_end_ms_p50']:.0f} ms; peak RSS {rss:.0f} MB")


def result_from_checkpoint(arm: str, peak_rss_mb_seen: float | None) -> dict:
    """Result of an arm stopped before its last epoch, rebuilt from the checkpoint saved after
    every epoch (`final` is then the last completed epoch's evaluation)."""
    import torch

    from models.engine.checkpoint import load_checkpoint

    ckpt = checkpoint_path(arm)
    state = load_checkpoint(ckpt)
    hist = state["history"]
    last = hist[-1]
    tcfg = state["train_config"]
    weights = state["model"]
    return {
        "arch": arm,
        "stopped_early": f"{len(hist)} of {tcfg.epochs} epochs completed in the time available",
        "train": {"dataset": "coco128", "epochs": len(hist), "planned_epochs": tcfg.epochs,
                  "batch_size": tcfg.batch_size, "short_side": tcfg.short_side,
                  "max_long_side": tcfg.max_long_side, "lr": tcfg.lr, "seed": tcfg.seed},
        "val": {"dataset": "coco_mini_train"},
        "history": hist,
        "final": {"segm": {k: last.get(k) for k in ("AP", "AP50", "AP75")},
                  "class_agnostic": {"AP": last.get("agnostic_AP"), "AP50": last.get("agnostic_AP50")}},
        "train_wall_s": sum(e["train_time_s"] for e in hist),
        "train_images_per_s": statistics.mean(e["images_per_s"] for e in hist),
        "peak_rss_mb": peak_rss_mb_seen,
        "params_m": sum(v.numel() for v in weights.values() if torch.is_floating_point(v)) / 1e6,
        "checkpoint_mb": ckpt.stat().st_size / 2**20,
        "weights_mb": sum(v.numel() * v.element_size() for v in weights.values()) / 2**20,
        "machine": machine(),
    }


def fmt(v: float | None, pct: bool = True) -> str:
    return "–" if v is None else (f"{100 * v:.1f}" if pct else f"{v:.0f}")


def report(arms: list[str]) -> None:
    """Combine per-arm JSONs into finetune.json, a markdown table and learning curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {a: json.loads((RESULTS / f"finetune_{a}.json").read_text()) for a in arms
               if (RESULTS / f"finetune_{a}.json").exists()}
    (RESULTS / "finetune.json").write_text(json.dumps(results, indent=2))
    m = next(iter(results.values()))["machine"]
    lines = [
        "# Fine-tuning benchmark: K-Net vs Mask R-CNN (MobileNetV2 ImageNet backbone)",
        "",
        f"Train: coco128 (128 images), val: coco_mini_train (80 images). Machine: {m['cpu']}, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}, commit {m['commit']}.",
        "",
        "| arch | epochs | mask AP | AP50 | AP75 | class-agnostic AP | agn. AP50 | train img/s | peak RSS MB "
        "| latency p50 / p90 ms (end-to-end) | forward p50 ms | params M | checkpoint MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a, r in results.items():
        s, c, lat = r["final"]["segm"], r["final"]["class_agnostic"], r["latency"]
        lines.append(
            f"| {a} | {r['train']['epochs']}{' of ' + str(r['train']['planned_epochs']) if 'planned_epochs' in r['train'] else ''} | {fmt(s['AP'])} | {fmt(s['AP50'])} | {fmt(s['AP75'])} | {fmt(c['AP'])} "
            f"| {fmt(c['AP50'])} | {statistics.median(e['images_per_s'] for e in r['history']):.2f} "
            f"| {r['peak_rss_mb']:.0f} "
            f"| {lat['end_to_end_ms_p50']:.0f} / {lat['end_to_end_ms_p90']:.0f} | {lat['forward_ms_p50']:.0f} "
            f"| {r['params_m']:.2f} | {r['checkpoint_mb']:.1f} |"
        )
    lines += ["", "AP values are COCO mask AP in percent (pycocotools, iouType=segm). Train img/s is the median "
              "over epochs (an epoch that shared the 2 cores with other work runs slower). Latency: batch 1, "
              f"short side {next(iter(results.values()))['train']['short_side']}, 2 threads, PIL image in -> "
              "instances (RLE) out.", ""]
    (RESULTS / "finetune.md").write_text("\n".join(lines))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for a, r in results.items():
        ep = [e["epoch"] for e in r["history"]]
        axes[0].plot(ep, [e["loss"] for e in r["history"]], label=a)
        axes[1].plot(ep, [100 * (e.get("AP50") or 0) for e in r["history"]], marker="o", label=a)
        axes[2].plot(ep, [100 * (e.get("agnostic_AP50") or 0) for e in r["history"]], marker="o", label=a)
    for ax, t in zip(axes, ["train loss", "val mask AP50 (%)", "val class-agnostic AP50 (%)"]):
        ax.set_title(t)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "finetune_curves.png", dpi=100)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="knet,maskrcnn")
    p.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=100)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--max-size", type=int, default=640)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency-images", type=int, default=40)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue each arm from its per-epoch checkpoint in runs/bench (when there is one)")
    p.add_argument("--from-checkpoint", metavar="ARM",
                   help="write the result of an arm that was stopped early from its per-epoch checkpoint")
    p.add_argument("--peak-rss-mb", type=float, help="with --from-checkpoint: the peak RSS observed (VmHWM)")
    p.add_argument("--latency-only", action="store_true",
                   help="re-measure latency of the saved checkpoints (on a quiet machine) and update the JSONs")
    args = p.parse_args()
    if args.arm:
        return run_arm(args)
    arms = args.arms.split(",")
    if args.from_checkpoint:
        result = result_from_checkpoint(args.from_checkpoint, args.peak_rss_mb)
        result["latency"] = {}
        (RESULTS / f"finetune_{args.from_checkpoint}.json").write_text(json.dumps(result, indent=2))
        return
    if args.latency_only:
        from models.data.coco import CocoAnnotations

        data = require_data()
        val = CocoAnnotations(data / "coco_mini_train/annotations/instances_train2017.json",
                              data / "coco_mini_train/train2017")
        paths = [val.image_path(im) for im in val.images[: args.latency_images]]
        for arm in arms:
            path = RESULTS / f"finetune_{arm}.json"
            result = json.loads(path.read_text())
            result["latency"] = latency(checkpoint_path(arm), paths, args.threads)
            path.write_text(json.dumps(result, indent=2))
            print(arm, result["latency"])
        args.report_only = True
    if not args.report_only:
        for arm in arms:
            cmd = [sys.executable, __file__, "--arm", arm] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("arms", "arm", "report_only", "from_checkpoint", "peak_rss_mb", "latency_only",
                             "resume")
            ] + (["--resume"] if args.resume else [])
            subprocess.run(cmd, check=True)
    report(arms)


if __name__ == "__main__":
    main()
