"""`uplvp client ...`: talk to a running service from the shell.

    uplvp client finetune data.zip --name shapes --time-budget 10 --wait # live progress bar
    uplvp client finetune photos/ --annotations coco.json --name shapes  # a folder + one COCO JSON
    uplvp client segment img.jpg --model shapes --out overlay.png        # .png: overlay, else JSON
    uplvp client jobs [--state running]
    uplvp client models
    uplvp client export photos/ --model shapes --out predictions.json    # COCO JSON of predictions

--url (default $UPLVP_URL or http://127.0.0.1:8000) and --api-key (default $UPLVP_API_KEY).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from client import Client, ServiceError, zip_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uplvp client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="service URL (default $UPLVP_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="API key (default $UPLVP_API_KEY)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="upload a dataset and fine-tune")
    p.add_argument("dataset", type=Path, help="a zip (COCO or labelme) or a folder")
    p.add_argument("--annotations", type=Path, help="a COCO JSON for a folder of images kept apart from it")
    p.add_argument("--name", required=True)
    p.add_argument("--base", help="none | pretrained | <model>[:<version>]")
    p.add_argument("--unlabeled", type=Path, help="zip or folder of extra unlabeled images (with --base pretrained)")
    for flag, typ in (("--time-budget", float), ("--epochs", int), ("--image-size", int), ("--val-fraction", float),
                      ("--seed", int), ("--lr", float), ("--batch-size", int)):
        p.add_argument(flag, type=typ)
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")

    p = sub.add_parser("segment", help="segment images with a model")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--version", type=int)
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--out", type=Path, help="*.png: an overlay (one image); otherwise the JSON answer")

    p = sub.add_parser("jobs", help="list jobs, newest first")
    p.add_argument("--state")
    p.add_argument("--name")
    p.add_argument("--limit", type=int, default=20)

    sub.add_parser("models", help="list models, versions and aliases")

    p = sub.add_parser("export", help="predictions on a folder of images as COCO JSON")
    p.add_argument("folder", type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--version", type=int)
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--out", type=Path, required=True)
    return parser


class ProgressBar:
    """A tqdm bar over a job's 0..1 progress, its stage and latest loss in the description."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=1000, unit="‰", bar_format="{l_bar}{bar}| {postfix}", file=sys.stderr)

    def __call__(self, job: dict[str, Any]) -> None:
        self.bar.n = int(1000 * job["progress"])
        loss = (job.get("losses") or {}).get("loss")
        self.bar.set_description(f"{job['state']} {job.get('stage') or ''}".strip())
        eta = f" eta {job['eta_s']:.0f}s" if job.get("eta_s") else ""
        self.bar.set_postfix_str(f"epoch {job['epoch']}/{job['epochs']}"
                                 + (f" loss {loss:.3f}" if loss is not None else "") + eta)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def run(args: argparse.Namespace) -> int:
    c = Client(args.url, args.api_key)
    if args.command == "finetune":
        data: Any = zip_folder(args.dataset, args.annotations) if args.dataset.is_dir() else args.dataset
        fields = {"base": args.base, "time_budget_min": args.time_budget, "epochs": args.epochs,
                  "image_size": args.image_size, "val_fraction": args.val_fraction, "seed": args.seed, "lr": args.lr,
                  "batch_size": args.batch_size}
        if not args.wait:
            job = c.finetune(data, args.name, args.unlabeled, **fields)
            print(json.dumps({"id": job["id"], "state": job["state"]}))
            return 0
        bar = ProgressBar()
        try:
            job = c.finetune(data, args.name, args.unlabeled, wait=True, on_progress=bar, **fields)
        finally:
            bar.close()
        if job["state"] != "succeeded":
            print(f"job {job['id']} {job['state']}: {(job.get('error') or {}).get('message', '')}", file=sys.stderr)
            return 1
        metrics = job["result"]["metrics"]
        segm = metrics.get("segm", {})
        print(f"{job['result']['model']} v{job['result']['version']}: mask AP {100 * segm.get('AP', 0):.1f} %, "
              f"AP50 {100 * segm.get('AP50', 0):.1f} % (on {metrics.get('evaluated_on')})"
              + (f"; test split: mask AP {100 * (metrics['test']['segm'].get('AP') or 0):.1f} %, "
                 f"AP50 {100 * (metrics['test']['segm'].get('AP50') or 0):.1f} %" if metrics.get("test") else ""))
        return 0
    if args.command == "segment":
        png = args.out is not None and args.out.suffix.lower() == ".png"
        res = c.segment(args.images, args.model, args.version, args.score_threshold, "png" if png else "json",
                        args.out if png else None)
        if png:
            print(f"overlay written to {args.out}")
        elif args.out:
            args.out.write_text(json.dumps(res))
            print(f"{sum(len(i['instances']) for i in res['images'])} instances written to {args.out}")
        else:
            print(json.dumps(res))
        return 0
    if args.command == "jobs":
        page = c.jobs(args.state, args.name, limit=args.limit)
        for j in page["items"]:
            print(f"{j['id']}  {j['kind']:8} {j['name']:20} {j['state']:9} {j.get('stage') or '':11} "
                  f"{100 * j['progress']:5.1f} %  {j['created_at']}")
        print(f"({len(page['items'])} of {page['total']})")
        return 0
    if args.command == "models":
        for m in c.models():
            aliases = ", ".join(f"{a}=v{v}" for a, v in m["aliases"].items())
            print(f"{m['name']:24} versions {m['versions']}  {aliases}")
        return 0
    if args.command == "export":
        coco = c.export(args.folder, args.model, args.version, args.score_threshold)
        args.out.write_text(json.dumps(coco))
        print(f"{len(coco['annotations'])} predictions on {len(coco['images'])} images written to {args.out}")
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ServiceError as exc:
        print(f"uplvp client {args.command}: {exc.message}" + (f" ({exc.code})" if exc.code else ""), file=sys.stderr)
        if exc.details:
            for d in exc.details[:10] if isinstance(exc.details, list) else [exc.details]:
                print(f"  - {d}", file=sys.stderr)
        return 2
