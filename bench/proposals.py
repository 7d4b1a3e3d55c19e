"""Masks Proposal benchmark: how good are the pseudo masks, scored against real annotations?

On ../shared/data/coco128 (labels used only for scoring) with the 80 COCO names as the
vocabulary, for the offline engine and two language-free baselines (grid boxes, saliency
components):
  - class-agnostic mask recall at IoU 0.5 with K = 10 and 20 masks per image (also per COCO size);
  - pseudo-mask AP (COCOeval segm) with categories, and class-agnostic;
  - category accuracy of the top-10 proposals that match a ground-truth instance (IoU >= 0.5);
  - images per second on 2 threads (image decoding included, model loading not) and peak RSS.
Each engine runs in its own process (through `uplvp propose`'s code path) so its peak RSS is its own.

    python bench/proposals.py                      # all engines on coco128
    python bench/proposals.py --dataset coco_mini_train --engines offline   # the set defaults were chosen on
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, ROOT, machine, peak_rss_mb, require_data  # noqa: E402

DATASETS = {
    "coco128": ("coco128/annotations/instances_val2017.json", "coco128/val2017"),
    "coco_mini_train": ("coco_mini_train/annotations/instances_train2017.json", "coco_mini_train/train2017"),
}
KS = (10, 20)


def out_path(dataset: str, engine: str) -> Path:
    return ROOT / "runs" / "bench" / f"proposals_{dataset}_{engine}.json"


def run_engine(args: argparse.Namespace) -> None:
    """Child process: build the engine, propose for every image, record speed and memory."""
    import torch

    from models.uplvp.proposals import COCO_CLASSES, build_engine, propose_folder

    torch.set_num_threads(args.threads)
    data = require_data()
    images = data / DATASETS[args.dataset][1]
    t0 = time.perf_counter()
    engine = build_engine(args.engine, COCO_CLASSES)
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

    data = require_data()
    gt = json.loads((data / DATASETS[dataset][0]).read_text())
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


def report(dataset: str, engines: list[str]) -> None:
    rows = {e: score(dataset, e) for e in engines if out_path(dataset, e).with_suffix(".stats.json").exists()}
    result = {"dataset": dataset, "vocabulary": "coco (80 names)", "engines": rows, "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"proposals_{dataset}.json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    lines = [f"# Masks Proposal benchmark on {dataset} (vocabulary: the 80 COCO names)", "",
             f"Machine: {m['cpu']}, {rows[next(iter(rows))]['threads']} torch threads, torch {m['torch']}, "
             f"commit {m['commit']}.", "",
             "| engine | recall@10 | recall@20 | R@10 small / medium / large | mask AP | AP50 | class-agn. AP "
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
    lines += ["", f"Percentages. Ground truth: {any_row['gt_instances']} non-crowd instances "
              f"({any_row['gt_by_size']['small']} small < 32², {any_row['gt_by_size']['medium']} medium, "
              f"{any_row['gt_by_size']['large']} large). Recall: a ground-truth mask counts as found when one of "
              "the engine's top-K masks has IoU >= 0.5 with it, whatever the category. Category accuracy: of the "
              "top-10 proposals that match a ground-truth instance (IoU >= 0.5), the share whose category is the "
              "instance's (chance: 1/80 = 1.3 %; number matched in brackets). The baselines have no language, "
              "so they have no category metrics.", ""]
    (RESULTS / f"proposals_{dataset}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="offline,saliency,grid")
    p.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine in this process
    p.add_argument("--dataset", default="coco128", choices=sorted(DATASETS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if args.engine:
        return run_engine(args)
    engines = args.engines.split(",")
    if not args.report_only:
        for e in engines:
            subprocess.run([sys.executable, __file__, "--engine", e, "--dataset", args.dataset,
                            "--threads", str(args.threads)], check=True)
    report(args.dataset, engines)


if __name__ == "__main__":
    main()
