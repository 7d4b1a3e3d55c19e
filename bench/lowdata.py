"""Low-data benchmark: does UPLVP pre-training make K-Net fine-tune faster and end better?

Arms (same ImageNet MobileNetV2 backbone, image size, fine-tuning epochs, lr and seeds):
  vanilla    K-Net fine-tuned from ImageNet only
  cosine     UPLVP K-Net: pre-trained on the unlabeled pool with offline-engine pseudo masks and
             prompts matched by cosine similarity (the paper's wording), then fine-tuned
  fixed      the same with the reference config's fixed slot matching          (ablation)
  none       pre-trained on the pseudo masks without prompts                     (ablation)
  maskrcnn   Mask R-CNN on the same backbone                                     (CNN reference)
Labelled fractions of coco128 (a fixed random subset per fraction, the same for every arm);
validation on the disjoint coco_mini_train after every epoch. Unlabeled pool: all images of
coco128 and coco_mini_train (labels hidden) and unlabeled/. Every run is a `uplvp` CLI call in its
own process; finished runs are skipped when the script is started again (resumable).

    nohup python bench/lowdata.py > runs/bench/lowdata.log 2>&1 &
    python bench/lowdata.py --report-only
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, ROOT, machine, require_data  # noqa: E402

WORK = ROOT / "runs" / "bench" / "lowdata"
STEM = "lowdata"  # result files bench/results/<STEM>.{json,md} and <STEM>_curves.png
FRACTIONS = (25, 50, 100)


def uplvp(*args: str) -> None:
    cmd = [sys.executable, "-m", "models.cli", *args]
    print("$ uplvp " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def build_pool(data: Path) -> Path:
    """A folder of symlinks to every pool image (the pseudo JSON's file names keep the source folder)."""
    pool = WORK / "pool"
    sources = {"coco128": data / "coco128/val2017", "coco_mini_train": data / "coco_mini_train/train2017",
               "unlabeled": data / "unlabeled"}
    for name, src in sources.items():
        for f in sorted(src.rglob("*")):
            if f.is_file():
                link = pool / name / f.relative_to(src)
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(f.resolve())
    return pool


def subset(data: Path, fraction: int) -> Path:
    """coco128's annotations restricted to a fixed random `fraction` % of its images (seed 0)."""
    out = WORK / f"coco128_{fraction}.json"
    if out.exists():
        return out
    coco = json.loads((data / "coco128/annotations/instances_val2017.json").read_text())
    images = sorted(coco["images"], key=lambda im: im["id"])
    random.Random(0).shuffle(images)
    keep = images[: round(len(images) * fraction / 100)]
    ids = {im["id"] for im in keep}
    out.write_text(json.dumps({**coco, "images": keep,
                               "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}))
    return out


def done(ckpt: Path, epochs: int) -> bool:
    if not ckpt.exists():
        return False
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return state.get("epoch", 0) >= epochs


def run(args: argparse.Namespace) -> None:
    data = require_data()
    WORK.mkdir(parents=True, exist_ok=True)
    size = ["--image-size", str(args.image_size), "--max-size", str(args.max_size), "--threads", str(args.threads)]
    pool = build_pool(data)
    pseudo = WORK / "pool_pseudo.json"
    timings_path = WORK / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    if not pseudo.exists():
        t0 = time.perf_counter()
        uplvp("propose", "--images", str(pool), "--vocab", "coco", "--engine", "offline", "--max-masks",
              str(args.slots), "--threads", str(args.threads), "--out", str(pseudo), "--no-progress")
        timings["propose_s"] = time.perf_counter() - t0
        timings_path.write_text(json.dumps(timings, indent=2))

    def pretrained(matching: str) -> Path:
        ckpt = WORK / f"pretrain_{matching}.pt"
        if not done(ckpt, args.pretrain_epochs):
            t0 = time.perf_counter()
            uplvp("pretrain", "--images", str(pool), "--pseudo", str(pseudo), "--matching", matching,
                  "--slots", str(args.slots), "--epochs", str(args.pretrain_epochs), "--lr", str(args.pretrain_lr),
                  "--warmup-iters", "50", "--batch-size", "2", "--seed", "0", "--out", str(ckpt), "--no-progress",
                  *size, *(["--resume", str(ckpt)] if ckpt.exists() else []))
            timings[f"pretrain_{matching}_s"] = time.perf_counter() - t0
            timings_path.write_text(json.dumps(timings, indent=2))
        return ckpt

    def finetune(arm: str, fraction: int, seed: int) -> None:
        ckpt = WORK / f"ft_{arm}_{fraction}_s{seed}.pt"
        if done(ckpt, args.epochs):
            return
        init = [] if arm in ("vanilla", "maskrcnn") else ["--init", str(pretrained(arm))]
        uplvp("finetune", "--train-ann", str(subset(data, fraction)), "--train-images", str(data / "coco128/val2017"),
              "--val-ann", str(data / "coco_mini_train/annotations/instances_train2017.json"),
              "--val-images", str(data / "coco_mini_train/train2017"), "--epochs", str(args.epochs),
              "--lr", str(args.lr), "--warmup-iters", str(args.warmup_iters), "--batch-size", "2",
              "--seed", str(seed), "--arch", "maskrcnn" if arm == "maskrcnn" else "knet",
              "--out", str(ckpt), "--no-progress", *size, *init,
              *(["--resume", str(ckpt)] if ckpt.exists() else []))

    # most informative first, so a run cut short still answers the main question
    plan = [("vanilla", 50, 0), ("cosine", 50, 0), ("vanilla", 50, 1), ("cosine", 50, 1),
            ("vanilla", 25, 0), ("cosine", 25, 0), ("vanilla", 100, 0), ("cosine", 100, 0),
            ("none", 50, 0), ("none", 50, 1), ("fixed", 50, 0), ("fixed", 50, 1),
            ("maskrcnn", 50, 0), ("maskrcnn", 25, 0), ("maskrcnn", 100, 0)]
    wanted = set(args.arms.split(","))
    fractions = {int(f) for f in args.fractions.split(",")}
    for arm, fraction, seed in plan:
        if arm in wanted and fraction in fractions:
            finetune(arm, fraction, seed)
            report(args)


def _history(path: Path) -> list[dict]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["history"]


def report(args: argparse.Namespace) -> None:
    """Collect every finished (or partial) run into lowdata.json, lowdata.md and lowdata_curves.png."""
    runs: dict[str, dict[int, dict[int, list[dict]]]] = {}
    if not any(WORK.glob("ft_*_s*.pt")) and (RESULTS / f"{STEM}.json").exists():
        # No work dir (a fresh clone): re-render the committed results instead of reading checkpoints.
        saved = json.loads((RESULTS / f"{STEM}.json").read_text())
        runs = {arm: {int(fr): {int(s): h for s, h in seeds.items()} for fr, seeds in by_fr.items()}
                for arm, by_fr in saved["runs"].items()}
        render(args, runs, saved["pretrain"], saved["timings"], saved["pool"], saved["machine"])
        return
    for f in sorted(WORK.glob("ft_*_s*.pt")):
        arm, fraction, seed = f.stem[3:].rsplit("_", 2)
        runs.setdefault(arm, {}).setdefault(int(fraction), {})[int(seed[1:])] = _history(f)
    pre = {}
    for f in sorted(WORK.glob("pretrain_*.pt")):
        h = _history(f)
        pre[f.stem.removeprefix("pretrain_")] = {
            "epochs": len(h), "wall_s": sum(e["train_time_s"] for e in h),
            "images_per_s": statistics.median(e["images_per_s"] for e in h), "loss": [e["loss"] for e in h]}
    timings = json.loads((WORK / "timings.json").read_text()) if (WORK / "timings.json").exists() else {}
    pseudo = WORK / "pool_pseudo.json"
    pool = {}
    if pseudo.exists():
        p = json.loads(pseudo.read_text())
        pool = {"images": len(p["images"]), "pseudo_masks": len(p["annotations"]), "skipped": len(p["skipped"])}
    render(args, runs, pre, timings, pool, machine())


def render(args: argparse.Namespace, runs: dict[str, dict[int, dict[int, list[dict]]]], pre: dict, timings: dict,
           pool: dict, machine_info: dict) -> None:
    """Write lowdata.json, lowdata.md and lowdata_curves.png from the collected histories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = {"settings": {k: v for k, v in vars(args).items() if k != "report_only"}, "pool": pool,
              "pretrain": pre, "timings": timings, "runs": runs, "machine": machine_info}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{STEM}.json").write_text(json.dumps(result, indent=2))

    def final(h: list[dict], key: str) -> float:
        return h[-1].get(key) or 0.0

    def mean(arm: str, fraction: int, key: str) -> float | None:
        hs = [h for h in runs.get(arm, {}).get(fraction, {}).values() if len(h) == args.epochs]
        return statistics.mean(final(h, key) for h in hs) if hs else None

    def epochs_to(arm: str, fraction: int, target: float) -> str:
        """Mean over seeds of the first epoch whose AP50 reaches `target` ("–" if never)."""
        firsts = []
        for h in runs.get(arm, {}).get(fraction, {}).values():
            hit = [e["epoch"] for e in h if (e.get("AP50") or 0) >= target]
            firsts.append(hit[0] if hit else None)
        if not firsts or any(f is None for f in firsts):
            return "–"
        return f"{statistics.mean(firsts):.1f}"

    pct = lambda v: "–" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = ["# Low-data benchmark: vanilla K-Net vs UPLVP K-Net (and ablations, Mask R-CNN)", "",
             f"Fine-tuning: {args.epochs} epochs, short side {args.image_size} (long ≤ {args.max_size}), batch 2, "
             f"lr {args.lr}, warm-up {args.warmup_iters} steps; labelled: a fixed subset of coco128; val: "
             f"coco_mini_train (80 images). Pre-training: {args.pretrain_epochs} epochs on the unlabeled pool "
             f"({pool.get('images', '?')} images, {pool.get('pseudo_masks', '?')} offline-engine pseudo masks, "
             f"≤ {args.slots} per image), lr {args.pretrain_lr}, backbone frozen. Machine: {result['machine']['cpu']}, "
             f"{args.threads} threads.", "",
             "| arm | labelled | seeds | mask AP % | AP50 % | class-agn. AP % | final train loss "
             "| epochs to vanilla's final AP50 |",
             "|---|---|---|---|---|---|---|---|"]
    shown = [f for f in FRACTIONS if any(f in by_fraction for by_fraction in runs.values())]
    for fraction in shown:
        target = mean("vanilla", fraction, "AP50")
        if not target or target < 0.001:  # vanilla below 0.1 % AP50 learnt nothing: reaching it says nothing
            target = None
        for arm in ("vanilla", "cosine", "fixed", "none", "maskrcnn"):
            seeds = [s for s, h in runs.get(arm, {}).get(fraction, {}).items() if len(h) == args.epochs]
            if not seeds:
                continue
            lines.append(f"| {arm} | {fraction}% | {len(seeds)} | {pct(mean(arm, fraction, 'AP'))} "
                         f"| {pct(mean(arm, fraction, 'AP50'))} | {pct(mean(arm, fraction, 'agnostic_AP'))} "
                         f"| {mean(arm, fraction, 'loss'):.2f} "
                         f"| {epochs_to(arm, fraction, target) if target is not None else '–'} |")
    lines += ["", "| pre-training | epochs | wall s | img/s | loss first → last |", "|---|---|---|---|---|"]
    for k, v in pre.items():
        lines.append(f"| {k} | {v['epochs']} | {v['wall_s']:.0f} | {v['images_per_s']:.2f} "
                     f"| {v['loss'][0]:.3f} → {v['loss'][-1]:.3f} |")
    lines += ["", "Epochs to vanilla's final AP50: '–' where vanilla's final AP50 is below 0.1 % (nothing to reach) "
              "or the arm never reaches it. Final train loss: the fine-tuning loss of the last epoch (mean over seeds)."]
    if "propose_s" in timings:
        lines += ["", f"Proposing pseudo masks for the pool took {timings['propose_s']:.0f} s."]
    (RESULTS / f"{STEM}.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
    for ax, fraction in zip(axes[0], shown):
        for arm, by_fraction in runs.items():
            for seed, h in sorted(by_fraction.get(fraction, {}).items()):
                ax.plot([e["epoch"] for e in h], [100 * (e.get("AP50") or 0) for e in h], marker="o",
                        linestyle="-" if seed == 0 else "--", label=f"{arm} s{seed}")
        ax.set_title(f"{fraction}% of coco128: val AP50 (%)")
        ax.set_xlabel("fine-tuning epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{STEM}_curves.png", dpi=100)
    print("\n".join(lines), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="vanilla,cosine,none,fixed,maskrcnn")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-iters", type=int, default=20)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--max-size", type=int, default=416)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--pretrain-lr", type=float, default=2e-4)
    p.add_argument("--slots", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fractions", default="25,50,100", help="labelled fractions of coco128 to run (%%)")
    p.add_argument("--tag", default="", help="a separate experiment: work dir runs/bench/lowdata_<tag>, "
                   "results bench/results/lowdata_<tag>.*")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    global WORK, STEM
    if args.tag:
        WORK, STEM = WORK.with_name(f"lowdata_{args.tag}"), f"lowdata_{args.tag}"
    if args.report_only:
        report(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
