"""Where a fine-tuning step's time goes: data loading, forward, criterion (matcher + losses),
backward and the optimizer, for the recipe's model on a real COCO dataset, on N threads.

    .venv/bin/python bench/profile_step.py --ann ../shared/data/lowdata/balloon/annotations/train.json \
        --images ../shared/data/lowdata/balloon/images --steps 30 --threads 2 [--set '{"neck_conv": "full"}']

Prints the median ms of each phase over the timed steps (the first few are warm-up), the images
per second of the whole step, and torch.profiler's top operators by self CPU time over a few more
steps. Run it on an otherwise idle machine: it measures wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ann", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--set", default="{}", help="JSON of FinetuneParams fields on top of the recipe")
    ap.add_argument("--profile-steps", type=int, default=8, help="steps under torch.profiler (0: none)")
    ap.add_argument("--contiguous", action="store_true",
                    help="weights and images in the default memory format (training steps run in channels_last)")
    args = ap.parse_args()

    import torch

    from models.data.coco import CocoAnnotations
    from models.data.dataset import CocoDataset, make_loader
    from models.engine.train import build_optimizer
    from models.nets.build import build_model
    from models.pipeline import FinetuneParams

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ann = CocoAnnotations(args.ann, args.images)
    params = FinetuneParams(**json.loads(args.set)).for_data(ann)
    tcfg = params.train_config(len(ann.images))
    mcfg = params.model_config(len(ann.categories), ann.max_instances())
    model = build_model(mcfg, tcfg.short_side, tcfg.max_long_side)
    model.train()
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last  # as models.engine.train
    model.to(memory_format=fmt)
    train_set = CocoDataset(ann, params.transform(train=True).with_size(tcfg.short_side, tcfg.max_long_side),
                            train=True)
    opt = build_optimizer(model, tcfg)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    print(f"image size {tcfg.short_side}/{tcfg.max_long_side}, kernels {mcfg.num_kernels}, batch {tcfg.batch_size}, "
          f"threads {args.threads}, workers {args.workers}, set {args.set}, channels_last {not args.contiguous}", flush=True)

    def batches():
        epoch = 0
        while True:
            yield from make_loader(train_set, tcfg.batch_size, shuffle=True, seed=epoch, num_workers=args.workers)
            epoch += 1

    it = batches()
    phases: dict[str, list[float]] = {k: [] for k in ("load", "forward", "criterion", "backward", "optimizer", "step")}

    def one_step() -> dict[str, float]:
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        out = model.net(batch.images.contiguous(memory_format=fmt))
        t2 = time.perf_counter()
        losses = model.criterion(out, batch.targets)
        loss = model.criterion.total(losses)
        t3 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip)
        opt.step()
        float(loss.detach())
        t5 = time.perf_counter()
        return {"load": t1 - t0, "forward": t2 - t1, "criterion": t3 - t2, "backward": t4 - t3,
                "optimizer": t5 - t4, "step": t5 - t0}

    for i in range(args.warmup + args.steps):
        t = one_step()
        if i >= args.warmup:
            for k, v in t.items():
                phases[k].append(v)
    med = {k: 1000 * float(np.median(v)) for k, v in phases.items()}
    print("median ms per step: " + ", ".join(f"{k} {v:.0f}" for k, v in med.items()))
    print(f"images/s (median step): {tcfg.batch_size / (med['step'] / 1000):.2f}")
    if args.profile_steps:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                one_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
