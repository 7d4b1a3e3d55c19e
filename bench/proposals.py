"""Masks Proposal benchmark: how good are the pseudo masks, scored against real annotations?

On COCO (coco128, coco_mini_train; the 80 COCO names as the vocabulary) and on the pools of the
real low-data datasets (../shared/data/lowdata: a seeded sample of their train + val images, the
dataset's own class names as the vocabulary), labels used only for scoring, for every engine:
  - class-agnostic mask recall at IoU 0.5 with K = 10 and 20 masks per image (also per COCO size);
  - pseudo-mask AP (COCOeval segm) with categories, and class-agnostic;
  - category accuracy of the top-10 proposals that match a ground-truth instance (IoU >= 0.5);
  - images per second on 2 threads (image decoding included, model loading not) and peak RSS.
Each engine runs in its own process (through `uplvp propose`'s code path) so its peak RSS is its own.
An engine is a name, optionally with settings of its config after a colon (an ablation):
`maskcut:ncut_tau=0.3,ncut_features=final`.

    python bench/proposals.py                      # all engines on coco128
    python bench/proposals.py --dataset coco_mini_train --engines offline   # the set defaults were chosen on
    python bench/proposals.py --dataset lowdata --engines offline maskcut saliency grid   # the six dev pools
    python bench/proposals.py --dataset lowdata --engines maskcut maskcut:group_segments=true \
        --report-name lowdata_grouping                                                   # an ablation, beside it
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, ROOT, machine, peak_rss_mb, require_data  # noqa: E402

COCO = {
    "coco128": ("coco128/annotations/instances_val2017.json", "coco128/val2017"),
    "coco_mini_train": ("coco_mini_train/annotations/instances_train2017.json", "coco_mini_train/train2017"),
}
LOWDATA = ("balloon", "bottles", "dsb2018_nuclei", "endangered_animals", "kudzu_bug", "rice_leaf")
POOL_IMAGES = 40  # images sampled (seeded) from a dev dataset's train + val to score proposals on
KS = (10, 20)
WORK = ROOT / "runs" / "bench" / "proposals"


def _safe(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)


def out_path(dataset: str, engine: str) -> Path:
    return WORK / f"{dataset}_{_safe(engine)}.json"


def prepare(dataset: str) -> tuple[Path, Path, list[str] | None]:
    """(ground-truth COCO JSON, image folder, vocabulary or None for the COCO names) of a dataset.

    A dev dataset's pool is a seeded sample of POOL_IMAGES of its train + val images: linked into
    a folder of their own, with their annotations merged into one ground-truth file (scoring only).
    """
    data = require_data()
    if dataset in COCO:
        return data / COCO[dataset][0], data / COCO[dataset][1], None
    root = data / "lowdata" / dataset
    images, annotations, categories = [], [], None
    for split in ("train", "val"):
        path = root / "annotations" / f"{split}.json"
        if not path.is_file():
            continue
        coco = json.loads(path.read_text())
        categories = coco["categories"]
        offset = 1 + max((im["id"] for im in images), default=0)  # ids of two splits may collide
        images += [{**im, "id": im["id"] + offset} for im in coco["images"]]
        annotations += [{**a, "image_id": a["image_id"] + offset} for a in coco["annotations"]]
    images = sorted(images, key=lambda im: im["file_name"])
    random.Random(0).shuffle(images)
    images = images[:POOL_IMAGES]
    keep = {im["id"] for im in images}
    annotations = [{**a, "id": i + 1} for i, a in enumerate(a for a in annotations if a["image_id"] in keep)]
    folder = WORK / "pools" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    for im in images:
        link = folder / Path(im["file_name"]).name
        if not link.exists():
            link.symlink_to((root / "images" / im["file_name"]).resolve())
    images = [{**im, "file_name": Path(im["file_name"]).name} for im in images]
    gt = WORK / "pools" / f"{dataset}.json"
    gt.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return gt, folder, [c["name"] for c in categories]


def build(spec: str, vocabulary: list[str]):
    """An engine from a spec `name[:key=value,...]`; the settings replace fields of its config."""
    from dataclasses import replace

    from models.uplvp.proposals import build_engine

    name, _, settings = spec.partition(":")
    engine = build_engine(name, vocabulary)
    if settings:
        overrides = {}
        for item in settings.split(","):
            key, _, value = item.partition("=")
            try:
                overrides[key] = json.loads(value)
            except json.JSONDecodeError:
                overrides[key] = value
        engine.cfg = replace(engine.cfg, **overrides)
    return engine


def run_engine(args: argparse.Namespace) -> None:
    """Child process: build the engine, propose for every image, record speed and memory."""
    import torch

    from models.uplvp.proposals import COCO_CLASSES, propose_folder

    torch.set_num_threads(args.threads)
    _, images, vocabulary = prepare(args.dataset)
    t0 = time.perf_counter()
    engine = build(args.engine, vocabulary or COCO_CLASSES)
    load_s = time.perf_counter() - t0
    out = out_path(args.dataset, args.engine)
    out.unlink(missing_ok=True)
    out.with_name(out.name + ".partial.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    coco = propose_folder(images, engine, out, max_masks=max(KS))
    wall = time.perf_counter() - t0
    stats = {"engine": args.engine, "images": len(coco["images"]), "load_s": load_s, "propose_s": wall,
             "images_per_s": len(coco["images"]) / wall, "peak_rss_mb": peak_rss_mb(), "threads": args.threads}
    out.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2))


def score(dataset: str, engine: str) -> dict:
    """Recall@K, AP, category accuracy of one engine's saved proposals against the real annotations."""
    import numpy as np
    import torch

    from models.data.masks import decode_rle, segmentation_to_rle
    from models.engine.evaluate import evaluate_segm
    from models.engine.predict import mask_iou

    gt = json.loads(prepare(dataset)[0].read_text())
    pred = json.loads(out_path(dataset, engine).read_text())
    stats = json.loads(out_path(dataset, engine).with_suffix(".stats.json").read_text())
    gt_by_name = {im["file_name"]: im for im in gt["images"]}
    gt_cat_name = {c["id"]: c["name"] for c in gt["categories"]}
    name_to_gt_id = {c["name"]: c["id"] for c in gt["categories"]}
    pred_cat_name = {c["id"]: c["name"] for c in pred["categories"]}
    language = all(n in name_to_gt_id for n in pred_cat_name.values())
    anns_by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        anns_by_image.setdefault(a["image_id"], []).append(a)
    preds_by_image: dict[int, list[dict]] = {}
    for a in pred["annotations"]:
        preds_by_image.setdefault(a["image_id"], []).append(a)

    hits = {k: 0 for k in KS}
    hits_by_size = {k: {"small": 0, "medium": 0, "large": 0} for k in KS}
    n_by_size = {"small": 0, "medium": 0, "large": 0}
    total = matched = correct = 0
    results = []
    for im in pred["images"]:
        g_im = gt_by_name[im["file_name"]]
        h, w = g_im["height"], g_im["width"]
        gts = [a for a in anns_by_image.get(g_im["id"], []) if not a.get("iscrowd")]
        props = sorted(preds_by_image.get(im["id"], []), key=lambda a: -a["score"])
        for a in props:
            cat = name_to_gt_id.get(pred_cat_name[a["category_id"]], gt["categories"][0]["id"])
            results.append({"image_id": g_im["id"], "category_id": cat, "segmentation": a["segmentation"],
                            "score": a["score"]})
        if not gts:
            continue
        sizes = ["small" if a["area"] < 32**2 else "medium" if a["area"] < 96**2 else "large" for a in gts]
        for s in sizes:
            n_by_size[s] += 1
        total += len(gts)
        if not props:
            continue
        g = torch.from_numpy(np.stack([decode_rle(segmentation_to_rle(a["segmentation"], h, w)) for a in gts]) > 0)
        p = torch.from_numpy(np.stack([decode_rle(a["segmentation"]) for a in props]) > 0)
        iou = mask_iou(p, g)
        for k in KS:
            found = iou[:k].max(0).values >= 0.5
            hits[k] += int(found.sum())
            for s, f in zip(sizes, found.tolist()):
                hits_by_size[k][s] += int(f)
        if language:
            for i, a in enumerate(props[:10]):
                j = int(iou[i].argmax())
                if iou[i, j] >= 0.5:
                    matched += 1
                    correct += pred_cat_name[a["category_id"]] == gt_cat_name[gts[j]["category_id"]]
    ap = evaluate_segm(gt, results, image_ids=[gt_by_name[im["file_name"]]["id"] for im in pred["images"]])
    return {
        "engine": engine, "dataset": dataset, "gt_instances": total,
        "recall": {f"R@{k}": hits[k] / total for k in KS},
        "recall_by_size": {f"R@{k}": {s: hits_by_size[k][s] / max(n_by_size[s], 1) for s in n_by_size} for k in KS},
        "gt_by_size": n_by_size,
        "AP": ap["segm"] if language else None,
        "agnostic_AP": ap["class_agnostic"],
        "category_accuracy": correct / matched if language and matched else None,
        "matched_proposals": matched if language else None,
        "masks_per_image": len(pred["annotations"]) / max(len(pred["images"]), 1),
        **{k: stats[k] for k in ("images_per_s", "peak_rss_mb", "load_s", "threads")},
    }


def fmt(v: float | None, pct: bool = True) -> str:
    return "–" if v is None else f"{100 * v:.1f}" if pct else f"{v:.2f}"


def table(dataset: str, rows: dict[str, dict], vocabulary: str) -> list[str]:
    """One dataset's markdown table of every engine's row."""
    lines = [f"| engine | recall@10 | recall@20 | R@10 small / medium / large | mask AP | AP50 | class-agn. AP "
             "| agn. AP50 | category accuracy | masks/img | img/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e, r in rows.items():
        bs = r["recall_by_size"]["R@10"]
        n_matched = "" if r["matched_proposals"] is None else f" ({r['matched_proposals']})"
        lines.append(
            f"| {e} | {fmt(r['recall']['R@10'])} | {fmt(r['recall']['R@20'])} "
            f"| {fmt(bs['small'])} / {fmt(bs['medium'])} / {fmt(bs['large'])} "
            f"| {fmt(r['AP']['AP'] if r['AP'] else None)} | {fmt(r['AP']['AP50'] if r['AP'] else None)} "
            f"| {fmt(r['agnostic_AP']['AP'])} | {fmt(r['agnostic_AP']['AP50'])} "
            f"| {fmt(r['category_accuracy'])}{n_matched} "
            f"| {r['masks_per_image']:.1f} | {r['images_per_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    any_row = next(iter(rows.values()))
    lines += ["", f"Ground truth: {any_row['gt_instances']} non-crowd instances "
              f"({any_row['gt_by_size']['small']} small < 32², {any_row['gt_by_size']['medium']} medium, "
              f"{any_row['gt_by_size']['large']} large); vocabulary: {vocabulary}.", ""]
    return lines


NOTE = ("Percentages. Recall: a ground-truth mask counts as found when one of the engine's top-K masks has IoU "
        ">= 0.5 with it, whatever the category. Category accuracy: of the top-10 proposals that match a "
        "ground-truth instance (IoU >= 0.5), the share whose category is the instance's (number matched in "
        "brackets). The baselines have no language, so they have no category metrics.")


def report(datasets: list[str], engines: list[str], name: str) -> None:
    """bench/results/proposals_<name>.{json,md}: a table per dataset, and the mean over datasets."""
    per: dict[str, dict[str, dict]] = {}
    for d in datasets:
        rows = {e: score(d, e) for e in engines if out_path(d, e).with_suffix(".stats.json").exists()}
        if rows:
            per[d] = rows
    if not per:
        raise SystemExit("nothing to report: run the engines first")
    m = machine()
    threads = next(iter(next(iter(per.values())).values()))["threads"]
    lines = [f"# Masks Proposal benchmark: {name}", "",
             f"Machine: {m['cpu']}, {threads} torch threads, torch {m['torch']}, commit {m['commit']}.", ""]
    summary = {}
    if len(per) > 1:
        complete = [e for e in engines if all(e in rows for rows in per.values())]
        lines += ["## Mean over datasets (each dataset weighs the same)", "",
                  "| engine | " + " | ".join(f"R@10 {d}" for d in per) + " | mean R@10 | mean R@20 | mean agn. AP "
                  "| mean category accuracy |",
                  "|---|" + "---|" * (len(per) + 4)]
        for e in complete:
            rs = [per[d][e] for d in per]
            acc = [r["category_accuracy"] for r in rs if r["category_accuracy"] is not None]
            summary[e] = {"R@10": sum(r["recall"]["R@10"] for r in rs) / len(rs),
                          "R@20": sum(r["recall"]["R@20"] for r in rs) / len(rs),
                          "agnostic_AP": sum(r["agnostic_AP"]["AP"] for r in rs) / len(rs),
                          "category_accuracy": sum(acc) / len(acc) if acc else None}
            lines.append(f"| {e} | " + " | ".join(fmt(r["recall"]["R@10"]) for r in rs)
                         + f" | {fmt(summary[e]['R@10'])} | {fmt(summary[e]['R@20'])} "
                           f"| {fmt(summary[e]['agnostic_AP'])} | {fmt(summary[e]['category_accuracy'])} |")
        lines.append("")
    for d, rows in per.items():
        vocab = "the 80 COCO names" if d in COCO else "the dataset's class names"
        lines += [f"## {d}", "", *table(d, rows, vocab)]
    lines += [NOTE, ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"datasets": per, "mean": summary, "machine": m,
              "pool": f"lowdata: {POOL_IMAGES} seeded images of train + val per dataset; COCO: every image"}
    (RESULTS / f"proposals_{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"proposals_{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs="+", default=["offline", "saliency", "grid"],
                   help="engine specs: name or name:key=value,... (settings of its config)")
    p.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine in this process
    p.add_argument("--dataset", default="coco128", choices=[*sorted(COCO), *LOWDATA, "lowdata"],
                   help="a dataset, or lowdata for all six dev pools")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--report-name", help="results as proposals_<name>.{json,md} (default: the dataset's name); "
                                         "another name keeps an ablation's table beside the committed one")
    args = p.parse_args()
    if args.engine:
        return run_engine(args)
    datasets = list(LOWDATA) if args.dataset == "lowdata" else [args.dataset]
    if not args.report_only:
        for d in datasets:
            for e in args.engines:
                if out_path(d, e).with_suffix(".stats.json").exists():
                    continue  # resumable: an engine already run on a dataset is not run again
                subprocess.run([sys.executable, __file__, "--engine", e, "--dataset", d,
                                "--threads", str(args.threads)], check=True)
    report(datasets, args.engines, args.report_name or args.dataset)


if __name__ == "__main__":
    main()
