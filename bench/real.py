"""Real low-data benchmark: K-Net (the recipe) vs K-Net (the old defaults) vs Mask R-CNN vs YOLOv8n-seg.

Data: the six datasets of shared/data/lowdata (people outside this project labelled them). For a
dataset, a labelled size L and a seed, the labelled set is a seeded subset of `train` with L images;
model selection uses the dataset's `val` (at most VAL_MAX images of it, seeded, so that evaluations
fit the budget) or, where there is none, a seeded 20 % of the labelled set; the score is pycocotools
segm AP on `test`, never seen before the end.

Arms, one after another in the same run, each for the same wall-clock training budget (default
10 minutes, evaluations on val included) on the same 2 threads:
  knet       K-Net with the recipe: models.pipeline.FinetuneParams' defaults and a time budget
  knet_old   K-Net with the defaults before the recipe (lr 1e-4, 384 px, decay at 2/3 and 11/12, no
             augmentation, class score only, last weights), its schedule laid over the same budget
  maskrcnn   Mask R-CNN on the same backbone, with the recipe's data pipeline and schedule
  yolo       Ultralytics YOLOv8n-seg from scratch (yolov8n-seg.yaml: no YOLO weights exist offline),
             its own `time=` budget and defaults, scored with the same pycocotools code
  uplvp, uplvp_maskcut, uplvp_self
             K-Net with the recipe after UPLVP pre-training, pseudo masks from the offline engine,
             the maskcut engine, or a teacher fine-tuned on the labelled set (self-training). The
             pool is the labelled images plus the unlabeled ones: the train images outside the
             labelled subset and the val images, labels stripped (never test). Teacher, proposals
             and pre-training all count inside the arm's budget (models.pipeline's shares).
  uplvp_once, uplvp_maskcut_once
             the paper's setting, pre-train once and fine-tune many times: proposals and a pre-training
             of `budget` minutes on the same pool, done once per (dataset, L, seed, engine) and NOT
             counted; the fine-tuning from it has the whole budget.
Learning curves: every evaluation's weights are kept and scored on test after the run (outside
its budget), so test AP can be drawn against training minutes; selection never sees test.

Each arm runs in its own process and writes runs/bench/real/<run>/result.json, the run's name ending
in this machine's kind of CPU (arms compare only within one kind); finished arms of this kind are
skipped when the script is started again, and an interrupted K-Net / Mask R-CNN arm resumes from
its checkpoint with the time it had already spent (resumable per arm). runs/ is not in git: on a
fresh checkout `--restore bench/results/real.json` puts the committed runs back first.

    .venv/bin/python bench/real.py --restore bench/results/real.json --dry-run   # what is missing here
    nohup .venv/bin/python bench/real.py > runs/bench/real.log 2>&1 &
    .venv/bin/python bench/real.py --datasets balloon --sizes 25 --seeds 0 1 --arms knet yolo
    .venv/bin/python bench/real.py --report-only     # bench/results/real.{json,md,png}

The YOLO arm needs the bench extra: `make bench-deps` (ultralytics, installed without its
dependencies so that it does not add opencv-python beside our headless build).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATA, RESULTS, ROOT, cpu_isa, machine  # noqa: E402

WORK = Path(os.environ.get("UPLVP_BENCH_WORK", ROOT / "runs" / "bench" / "real"))  # another folder: probes
# the committed report comes from the default folder; a probe's report stays beside its runs
OUT = RESULTS if "UPLVP_BENCH_WORK" not in os.environ else WORK
LOWDATA = DATA / "lowdata"
DATASETS = ("balloon", "endangered_animals", "rice_leaf", "kudzu_bug", "dsb2018_nuclei", "bottles")
ARMS = ("knet", "knet_old", "maskrcnn", "yolo", "uplvp", "uplvp_maskcut", "uplvp_self", "uplvp_once",
        "uplvp_maskcut_once")
UPLVP_ENGINES = {"uplvp": "offline", "uplvp_maskcut": "maskcut", "uplvp_self": "self"}  # pre-training counted
UPLVP_ONCE = {"uplvp_once": "offline", "uplvp_maskcut_once": "maskcut"}  # pre-trained once, not counted
ARM_NOTES = {
    "knet": "K-Net, the recipe (vanilla: no pre-training)",
    "knet_old": "K-Net, the defaults before the recipe",
    "maskrcnn": "Mask R-CNN on the same backbone and data pipeline",
    "yolo": "YOLOv8n-seg from scratch, its own time= budget",
    "uplvp": "UPLVP K-Net, offline engine, cosine matching; proposals and pre-training counted inside the budget",
    "uplvp_maskcut": "UPLVP K-Net, maskcut engine; counted inside the budget",
    "uplvp_self": "UPLVP K-Net, self-training (teacher on the labels); teacher, proposals, pre-training counted",
    "uplvp_once": "UPLVP K-Net, offline engine, pre-trained once on the pool for `budget` minutes NOT counted "
                  "(the paper's setting); the fine-tuning alone has the budget",
    "uplvp_maskcut_once": "as uplvp_once with the maskcut engine (pre-training NOT counted)",
}
VAL_MAX = 50  # val images used for model selection at most
THREADS = int(os.environ.get("UPLVP_BENCH_THREADS", "2"))

# The K-Net defaults before the recipe (what `uplvp finetune` did until then), laid over a budget.
OLD_DEFAULTS: dict[str, Any] = dict(lr=1e-4, image_size=384, max_size=640, warmup_iters=100, lr_steps=(2 / 3, 11 / 12),
                                    scale_min=1.0, scale_max=1.0, photometric=0.0, copy_paste=0.0, kernels=50,
                                    frozen_stages=1, light_p2=False, init_pool="sum", init_kernel_std=1.0, one_to_many=1,
                                    kernel_init="static", neck_conv="full",
                                    rescore=False, nms=False, keep_best=False, ema=0.0, batch_size=2)


ISA = cpu_isa() or "other"  # this machine's kind of CPU (bench.common.cpu_isa)

# The recipe's version, raised when FinetuneParams' defaults move enough to change what the recipe's arms
# score, so that a run of an older recipe neither stands in for the current one (resuming reruns it) nor
# pools with it in a row:
#   1  (no `recipe` in result.json) the recipe up to 920d8d5: no EMA, no copy-paste, sizes up to 640 px
#   2  EMA of the weights (1cadef7), copy-paste 0.5 (1f6e406), tiny objects up to 1024 px in 640-px crops (7b63b7a)
RECIPE = 2
FIXED_ARMS = ("knet_old", "yolo")  # pin their own settings: the recipe's version does not touch them


def recipe_of(run: dict[str, Any]) -> int | None:
    """The recipe version a run trained with (None for the arms that do not follow the recipe)."""
    return None if run["arm"] in FIXED_ARMS else run.get("recipe", 1)


def run_name(dataset: str, size: int | str, seed: int, arm: str, isa: str = ISA, recipe: int | None = RECIPE) -> str:
    """A run's folder. The CPU kind is part of it: arms compare only within one kind (cpu_of), so a run made
    on another kind of machine does not stand in for this one's, and resuming skips only this kind's runs.
    So is the recipe's version from version 2 on (version 1's folders had none)."""
    tag = f"_r{recipe}" if arm not in FIXED_ARMS and recipe is not None and recipe > 1 else ""
    return f"{dataset}_L{size}_s{seed}_{arm}_{isa}{tag}"


def label_of(run: dict[str, Any]) -> str:
    """The arm as the report names it: a run of an older recipe is `arm@r<version>`, a row of its own."""
    recipe = recipe_of(run)
    return run["arm"] if recipe in (None, RECIPE) else f"{run['arm']}@r{recipe}"


def restore(results: Path) -> int:
    """Put the runs of a report's JSON (e.g. the committed bench/results/real.json) back as result files
    under WORK (runs/ is not in git), so that resuming and the report see them; returns how many were new."""
    new = 0
    for r in json.loads(results.read_text())["runs"]:
        out = WORK / run_name(r["dataset"], r["L"], r["seed"], r["arm"], isa_of(r), recipe_of(r))
        if not (out / "result.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            (out / "result.json").write_text(json.dumps(r, indent=1))
            new += 1
    return new


# --------------------------------------------------------------------------- data


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def subset_coco(coco: dict, image_ids: set[int]) -> dict:
    return {**coco, "images": [im for im in coco["images"] if im["id"] in image_ids],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in image_ids]}


def prepare(dataset: str, size: int | str, seed: int) -> dict[str, Path]:
    """The labelled subset (and val) of one (dataset, L, seed) as COCO files under WORK/data."""
    root = LOWDATA / dataset
    out = WORK / "data" / f"{dataset}_L{size}_s{seed}"
    files = {"train": out / "train.json", "val": out / "val.json", "test": root / "annotations" / "test.json",
             "images": root / "images"}
    if files["train"].is_file():
        return files
    out.mkdir(parents=True, exist_ok=True)
    train = load_json(root / "annotations" / "train.json")
    ids = sorted(im["id"] for im in train["images"])
    rng = random.Random(seed)
    rng.shuffle(ids)
    chosen = ids if size == "all" else ids[: int(size)]
    if (root / "annotations" / "val.json").is_file():
        val = load_json(root / "annotations" / "val.json")
        vids = sorted(im["id"] for im in val["images"])
        random.Random(seed).shuffle(vids)
        files["val"].write_text(json.dumps(subset_coco(val, set(vids[:VAL_MAX]))))
        files["train"].write_text(json.dumps(subset_coco(train, set(chosen))))
    else:  # a seeded 20 % of the labelled set selects the model; the rest trains it
        n_val = max(1, round(0.2 * len(chosen)))
        files["val"].write_text(json.dumps(subset_coco(train, set(chosen[:n_val]))))
        files["train"].write_text(json.dumps(subset_coco(train, set(chosen[n_val:]))))
    return files


def pool_folders(files: dict[str, Path]) -> tuple[Path, Path | None]:
    """(folder of the labelled training images, folder of the unlabeled pool or None when it is
    empty) of a prepared run, as symlinks: UPLVP proposes on both, and must never see a test image.
    The pool is the dataset's train images outside the labelled training set plus its val images."""
    root = files["test"].parents[1]  # LOWDATA/<dataset>/annotations/test.json
    base = files["train"].parent
    labelled, pool = base / "labelled", base / "pool"
    if (base / "pool.done").is_file():
        return labelled, pool if json.loads((base / "pool.done").read_text())["pool"] else None
    chosen = {im["file_name"] for im in load_json(files["train"])["images"]}
    names = {im["file_name"] for im in load_json(root / "annotations" / "train.json")["images"]}
    if (root / "annotations" / "val.json").is_file():
        names |= {im["file_name"] for im in load_json(root / "annotations" / "val.json")["images"]}
    test = {im["file_name"] for im in load_json(files["test"])["images"]}
    for folder, members in ((labelled, chosen), (pool, names - chosen - test)):
        folder.mkdir(parents=True, exist_ok=True)
        for name in sorted(members):
            link = folder / name
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to((files["images"] / name).resolve())
    (base / "pool.done").write_text(json.dumps({"labelled": len(chosen), "pool": len(names - chosen - test)}))
    return labelled, pool if names - chosen - test else None


def max_gt_per_image(coco: dict) -> int:
    counts: dict[int, int] = {}
    for a in coco["annotations"]:
        counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    return max(counts.values(), default=0)


# --------------------------------------------------------------------------- arms (run in a child process)


def score_checkpoint(ckpt: Path, files: dict[str, Path]) -> dict[str, Any]:
    """pycocotools segm metrics of a checkpoint on the test split."""
    from models.data.coco import CategoryMap, CocoAnnotations
    from models.data.dataset import CocoDataset
    from models.engine.checkpoint import load_model
    from models.engine.inference import evaluate_model, prepare_for_inference
    from models.pipeline import FinetuneParams

    model, state = load_model(ckpt)
    tcfg = state["train_config"]
    ann = CocoAnnotations(files["test"], files["images"], categories=CategoryMap.from_coco(state["categories"]))
    ds = CocoDataset(ann, FinetuneParams(image_size=tcfg.short_side, max_size=tcfg.max_long_side).transform(False),
                     train=False)
    return evaluate_model(prepare_for_inference(model), ann, ds, 2, state["model_config"].mask_threshold)


def run_torch_arm(arm: str, files: dict[str, Path], budget_min: float, seed: int, out: Path) -> dict[str, Any]:
    import torch

    from models.engine.checkpoint import save_checkpoint
    from models.pipeline import FinetuneParams, PipelineHooks, run_finetune

    overrides: dict[str, Any] = {"knet": {}, "knet_old": dict(OLD_DEFAULTS), "maskrcnn": {"arch": "maskrcnn"}}.get(arm, {})
    if arm in UPLVP_ENGINES:
        overrides = {"pretrain": True, "proposal_engine": UPLVP_ENGINES[arm]}
    if arm in UPLVP_ONCE:
        overrides = {"proposal_engine": UPLVP_ONCE[arm]}
    overrides.update(json.loads(os.environ.get("UPLVP_BENCH_OVERRIDES", "{}")))  # ablations (bench --set)
    if arm == "knet_old":  # 50 kernels, or as many as the fullest image needs where 50 cannot hold it
        overrides["kernels"] = max(50, max_gt_per_image(load_json(files["train"])))
    from models.data.coco import CocoAnnotations

    train_ann = CocoAnnotations(files["train"], files["images"])
    # resolved here as run_finetune resolves it (image_size 0 follows the data), so that the snapshots
    # below record the size the model trained at
    params = FinetuneParams(time_budget_min=budget_min, seed=seed, threads=THREADS, val_fraction=0.0,
                            **overrides).for_data(train_ann)
    categories = train_ann.categories.to_coco()
    snaps: list[dict[str, Any]] = []
    snap_dir = out / "snapshots"

    def on_evaluation(model: Any, metrics: dict[str, Any]) -> None:
        path = snap_dir / f"step{metrics['step']:06d}.pt"
        if not path.is_file():
            save_checkpoint(path, model, model.cfg, params.train_config(1), categories, [])
        snaps.append({"step": metrics["step"], "elapsed_s": metrics["elapsed_s"], "val": metrics["segm"],
                      "path": str(path)})
        (out / "snapshots.json").write_text(json.dumps(snaps))

    if (out / "snapshots.json").is_file():
        snaps.extend(json.loads((out / "snapshots.json").read_text()))
    init, uncounted = None, None
    if arm in UPLVP_ONCE:
        init, uncounted = pretrain_once(files, params, train_ann, budget_min)
    t0 = time.perf_counter()
    train_images, unlabeled = (files["images"], None) if not params.pretrain else pool_folders(files)
    res = run_finetune(files["train"], train_images, out / "work", params, files["val"], files["images"], init=init,
                       hooks=PipelineHooks(on_evaluation=on_evaluation), export=False, unlabeled=unlabeled)
    wall = time.perf_counter() - t0
    test = score_checkpoint(res.artifact, files)
    curve = []
    for s in snaps:
        m = score_checkpoint(Path(s["path"]), files)
        curve.append({"minutes": s["elapsed_s"] / 60, "step": s["step"], "val_AP": s["val"]["AP"],
                      "test_AP": m["segm"]["AP"], "test_AP50": m["segm"]["AP50"]})
    hist = res.history
    ips = [e["images_per_s"] for e in hist if e.get("images_per_s")]
    return {"test": test, "val": {k: res.metrics.get("segm", {}).get(k) for k in ("AP", "AP50", "AP75")},
            "training": res.metrics.get("training"), "train_minutes": res.metrics["training"]["train_time_s"] / 60,
            "wall_minutes": wall / 60, "images_per_s": statistics.median(ips) if ips else None, "curve": curve,
            "params": {k: v for k, v in res.params.items() if k in overrides or k in ("time_budget_min", "seed")},
            "uncounted_pretraining": uncounted, "torch_threads": torch.get_num_threads()}


def pretrain_once(files: dict[str, Path], params: Any, train_ann: Any, budget_min: float) -> tuple[Path, dict]:
    """The uncounted arms' UPLVP pre-training: proposals on the labelled images and the pool, then
    `budget_min` minutes of pre-training, done once per (dataset, L, seed, engine) under WORK/pretrain
    and shared by the arms (and reruns) that fine-tune from it. The kernels are those the labelled
    data needs, so that the checkpoint loads as a base. Returns (pretrain.pt, what it took)."""
    import dataclasses

    from models.pipeline import run_uplvp_pretraining

    # the recipe's version too: its settings (image sizes, kernels) shape the pre-training as well
    work = WORK / "pretrain" / f"{files['train'].parent.name}_{params.proposal_engine}_{ISA}_r{RECIPE}"
    done = work / "done.json"
    if done.is_file():
        return work / "pretrain.pt", json.loads(done.read_text())
    kernels = params.model_config(len(train_ann.categories), train_ann.max_instances()).num_kernels
    t0 = time.perf_counter()
    folders = [f for f in pool_folders(files) if f is not None]
    ckpt = run_uplvp_pretraining(folders, list(train_ann.categories.names), work,
                                 dataclasses.replace(params, pretrain=True, kernels=kernels),
                                 budget_min=budget_min)
    info = {"engine": params.proposal_engine, "minutes": (time.perf_counter() - t0) / 60,
            "pretrain_budget_min": budget_min, "pool": json.loads((files["train"].parent / "pool.done").read_text())}
    done.write_text(json.dumps(info))
    return ckpt, info


def to_yolo(files: dict[str, Path], out: Path) -> Path:
    """The labelled subset and val as an Ultralytics YOLO-seg dataset (polygons, normalised), under `out`."""
    import numpy as np

    from models.data.masks import mask_to_polygons, segmentation_to_mask

    cats = sorted(load_json(files["train"])["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    for split in ("train", "val"):
        coco = load_json(files[split])
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        by_image: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for im in coco["images"]:
            src = files["images"] / im["file_name"]
            stem = f"{im['id']}_{Path(im['file_name']).stem}"
            link = out / "images" / split / f"{stem}{src.suffix}"
            if not link.exists():
                link.symlink_to(src.resolve())
            lines = []
            h, w = im["height"], im["width"]
            for a in by_image.get(im["id"], []):
                if a.get("iscrowd"):
                    continue
                polys = mask_to_polygons(np.asarray(segmentation_to_mask(a["segmentation"], h, w)))
                for poly in polys:  # one YOLO line per polygon piece of the instance
                    xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2) / [w, h]
                    lines.append(" ".join([str(index[a["category_id"]]), *(f"{v:.6f}" for v in xy.clip(0, 1).ravel())]))
            (out / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    yaml = out / "data.yaml"
    yaml.write_text(json.dumps({"path": str(out), "train": "images/train", "val": "images/val",
                                "names": {i: c["name"] for i, c in enumerate(cats)}}))
    return yaml


def run_yolo_arm(files: dict[str, Path], budget_min: float, seed: int, out: Path) -> dict[str, Any]:
    os.environ["YOLO_OFFLINE"] = "1"
    import numpy as np
    import torch
    import ultralytics.utils.torch_utils as tu
    from PIL import Image
    from ultralytics import YOLO

    from models.engine.evaluate import evaluate_segm
    from models.data.masks import encode_masks

    tu.NUM_THREADS = THREADS  # Ultralytics sets torch to cpu_count - 1 threads (1 here); the same 2 as every arm
    data = to_yolo(files, out / "yolo_data")
    t0 = time.perf_counter()
    model = YOLO("yolov8n-seg.yaml")
    model.train(data=str(data), time=budget_min / 60, epochs=1000, device="cpu", workers=0, seed=seed,
                pretrained=False, amp=False, plots=False, project=str(out.resolve()), name="train", exist_ok=True,
                verbose=False)
    wall = time.perf_counter() - t0
    best = out / "train" / "weights" / "best.pt"
    model = YOLO(str(best if best.is_file() else out / "train" / "weights" / "last.pt"))
    test = load_json(files["test"])
    cats = sorted(load_json(files["train"])["categories"], key=lambda c: c["id"])
    max_det = max(300, max_gt_per_image(test))
    results = []
    t1 = time.perf_counter()
    for im in test["images"]:
        path = files["images"] / im["file_name"]
        pred = model.predict(str(path), conf=0.001, max_det=max_det, retina_masks=True, device="cpu", verbose=False)[0]
        if pred.masks is None or len(pred.boxes) == 0:
            continue
        masks = pred.masks.data.cpu().numpy() > 0.5
        if masks.shape[1:] != (im["height"], im["width"]):  # retina masks are at the original size; be safe
            masks = np.stack([np.asarray(Image.fromarray(m).resize((im["width"], im["height"]))) for m in masks])
        for rle, cls, conf in zip(encode_masks(masks), pred.boxes.cls.tolist(), pred.boxes.conf.tolist()):
            results.append({"image_id": im["id"], "category_id": cats[int(cls)]["id"], "segmentation": rle,
                            "score": float(conf)})
    predict_s = time.perf_counter() - t1
    metrics = evaluate_segm(test, results)
    csv = out / "train" / "results.csv"
    epochs = max(0, len(csv.read_text().splitlines()) - 1) if csv.is_file() else None
    return {"test": metrics, "train_minutes": wall / 60, "wall_minutes": wall / 60, "epochs": epochs,
            "predict_s_per_image": predict_s / max(1, len(test["images"])), "curve": [],
            "params": {"time_budget_min": budget_min, "seed": seed, "model": "yolov8n-seg.yaml (scratch)",
                       "imgsz": 640, "batch": 16}, "torch_threads": torch.get_num_threads()}


def run_one(dataset: str, size: str, seed: int, arm: str, budget_min: float) -> None:
    import torch

    torch.set_num_threads(THREADS)
    # read before training: the commit is the code this process loaded, not whatever HEAD is when the arm ends
    # (results committed during a 10-minute arm would otherwise be named as its code)
    host = machine()
    size_v: int | str = size if size == "all" else int(size)
    files = prepare(dataset, size_v, seed)
    out = WORK / run_name(dataset, size_v, seed, arm)
    out.mkdir(parents=True, exist_ok=True)
    res = run_yolo_arm(files, budget_min, seed, out) if arm == "yolo" else run_torch_arm(arm, files, budget_min, seed, out)
    res.update({"dataset": dataset, "L": size_v, "seed": seed, "arm": arm, "budget_min": budget_min,
                **({} if arm in FIXED_ARMS else {"recipe": RECIPE}),
                "train_images": len(load_json(files["train"])["images"]),
                "val_images": len(load_json(files["val"])["images"]),
                "test_images": len(load_json(files["test"])["images"]), "machine": host})
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(f"{run_name(dataset, size_v, seed, arm)}: test AP {res['test']['segm']['AP']} "
          f"AP50 {res['test']['segm']['AP50']} in {res['train_minutes']:.1f} min", flush=True)


# --------------------------------------------------------------------------- report


def collect() -> list[dict[str, Any]]:
    """Every run under WORK, once: a run restored beside its folder of before (named without its CPU kind)
    is the same run (same dataset, L, seed, arm, CPU kind and commit) and counts once."""
    runs: dict[tuple, dict[str, Any]] = {}
    for path in sorted(WORK.glob("*/result.json")):
        r = json.loads(path.read_text())
        runs.setdefault((r["dataset"], str(r["L"]), r["seed"], r["arm"], isa_of(r), recipe_of(r),
                         r["machine"]["commit"]), r)
    return list(runs.values())


def overrides_of(run: dict[str, Any]) -> str:
    """A knet run's settings beyond its commit's defaults (knet_old and maskrcnn rows set theirs by design)."""
    if run["arm"] != "knet":
        return ""
    return ", ".join(f"{k}={v}" for k, v in run.get("params", {}).items() if k not in ("time_budget_min", "seed"))


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def mean_spread(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return pct(vals[0])
    return f"{pct(statistics.mean(vals))} ± {100 * (max(vals) - min(vals)) / 2:.1f}"


def isa_of(run: dict[str, Any]) -> str:
    """The vector ISA of the CPU a run trained on. Runs from before `isa` was recorded (commit 55fb521 and
    earlier) ran on an AMD EPYC without AVX-512 (bench/results/real_profile.txt's machine)."""
    return run["machine"].get("isa", "avx2")


def cpu_of(run: dict[str, Any]) -> str:
    """The CPU a run trained on, as the table names it."""
    return {"avx512": "EPYC/AVX-512", "avx2": "EPYC/AVX2"}.get(isa_of(run), run["machine"]["cpu"])


Groups = dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]]


def group_runs(runs: list[dict[str, Any]]) -> Groups:
    """The runs by (dataset, L, cpu), then by arm label (label_of): arms compare, and seeds pool, only within one
    kind of CPU and one recipe version. Older recipes' rows are `arm@r<version>`; the comparisons pair an arm
    only with peers of its own version."""
    groups: Groups = {}
    for r in runs:
        groups.setdefault((r["dataset"], str(r["L"]), cpu_of(r)), {}).setdefault(label_of(r), []).append(r)
    return groups


def recipe_age(label: str) -> int:
    """How many versions older than the current recipe an arm label (or its `@r<N>` tag) is: 0 for the current."""
    return RECIPE - int(label.split("@r")[1]) if "@r" in label else 0


def labels(groups: Groups) -> list[str]:
    """Every arm label present, in ARMS' order, each arm's older recipes after the newer."""
    present = {a for g in groups.values() for a in g}
    return sorted(present, key=lambda a: (ARMS.index(a.split("@")[0]), recipe_age(a)))


def level_of(groups: Groups) -> dict[tuple[str, str, str], str]:
    """Each group's L as the targets read it: "L = 100 (or all, if fewer)", so a dataset's L=all group counts as
    its L = 100 one when it has none on that CPU."""
    return {k: "100" if k[1] == "all" and (k[0], "100", k[2]) not in groups else k[1] for k in groups}


def report(runs: list[dict[str, Any]]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "real.json").write_text(json.dumps({"runs": runs}, indent=1))
    groups = group_runs(runs)
    lines = ["# Real low-data benchmark (bench/real.py)", "",
             "Test-split pycocotools segm metrics (%), equal wall-clock training budget per arm, 2 threads; "
             "mean ± half-range over seeds where there are several. Selection on val only.", ""]
    if runs:
        m = runs[-1]["machine"]
        lines += [f"Machines: {m['cpu']}, {m['cores_visible']} cores visible, torch {m['torch']} on {THREADS} threads. "
                  "Two kinds of CPU ran these rows, and the `cpu` column says which: EPYC/AVX2 (no AVX-512) and "
                  "EPYC/AVX-512, on which the same training step is about 2x faster, so a 10-minute budget trains "
                  "about twice as many steps. Seeds are pooled only within one kind of CPU, and arms compare only "
                  "within it. Each row names the commit its runs were made at, and under `set` what a K-Net run set "
                  "on top of that commit's defaults (UPLVP_BENCH_OVERRIDES).", ""]
    lines += ["Columns: test mask AP / AP50 / AP75; `val AP` is the selected checkpoint's AP on the selection split "
              "(never test); `maxDets` is the detections per image COCOeval counted on test (COCO's 100, raised to "
              "the densest test image's instance count).", "",
              "| dataset | L | arm | cpu | seeds | budget (min) | mask AP | AP50 | AP75 | val AP | maxDets | train img/s "
              "| commit | set |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (ds, size, cpu), arms in sorted(groups.items()):
        for arm in labels(groups):
            if rs := arms.get(arm, []):
                ips = [r["images_per_s"] for r in rs if r.get("images_per_s")]
                cells = [mean_spread([r["test"]["segm"][k] for r in rs]) for k in ("AP", "AP50", "AP75")]
                vals = [r["val"]["AP"] for r in rs if (r.get("val") or {}).get("AP") is not None]
                cells.append(mean_spread(vals) if len(vals) == len(rs) else "–")
                cells.append(str(rs[0]["test"].get("max_dets", "–")))
                lines.append(f"| {ds} | {size} | {arm} | {cpu} | {len(rs)} | {rs[0]['budget_min']:g} | "
                             f"{' | '.join(cells)} | {f'{statistics.median(ips):.2f}' if ips else '–'} | "
                             f"{', '.join(sorted({r['machine']['commit'][:7] for r in rs}))} | {overrides_of(rs[0])} |")
    present = [a for a in ARMS if any(a in arms for arms in groups.values())]
    lines += ["", "Arms: " + "; ".join(f"`{a}` {ARM_NOTES[a]}" for a in present) + "."]
    if any(recipe_age(a) for a in labels(groups)):
        lines += ["", f"`arm@r<N>`: the arm with version N of the recipe, not the current version {RECIPE} "
                  "(bench/real.py's RECIPE says what changed). The small tables show them beside the current version; "
                  "the comparisons below pair each arm only with peers of its own version."]
    lines += side_by_side(groups)
    lines += recipe_summary(groups)
    lines += uplvp_summary(groups)
    lines += ["", "Per category (test mask AP %, first seed):", ""]
    for (ds, size, cpu), arms in sorted(groups.items()):
        for arm in labels(groups):
            if arms.get(arm):
                per = arms[arm][0]["test"].get("per_category", {})
                lines.append(f"- {ds} L={size} {arm} ({cpu}): " + ", ".join(f"{k} {pct(v)}" for k, v in per.items()))
    (OUT / "real.md").write_text("\n".join(lines) + "\n")
    plot(groups)
    print("\n".join(lines))


def minutes_to_reach(curve: list[dict[str, Any]], target: float) -> float | None:
    """The first training minute at which a learning curve's test AP reaches `target` (None: never)."""
    return next((c["minutes"] for c in curve if (c["test_AP"] or 0.0) >= target), None)


def mean_test(rs: list[dict[str, Any]], metric: str = "AP") -> float:
    """The mean test mask `metric` (AP, AP50, ...) of one arm's runs (its seeds)."""
    return statistics.mean(r["test"]["segm"][metric] or 0.0 for r in rs)


def side_by_side(groups: Groups) -> list[str]:
    """The same rows as one small table per kind of CPU and L: a dataset per row, an arm per column (an older
    recipe's `arm@r<N>` beside the arm), test mask AP / AP50 (mean over seeds; the seed count in brackets when
    there are several)."""
    out: list[str] = []
    level = level_of(groups)
    for cpu, size in sorted({(k[2], level[k]) for k in groups}):
        here = {k[0]: g for k, g in sorted(groups.items()) if k[2] == cpu and level[k] == size}
        arms = [a for a in labels(groups) if any(a in g for g in here.values())]  # older recipes beside the current
        out += ["", f"**{cpu}, L = {size}{' (or all)' if size == '100' else ''}** (test mask AP / AP50 %):", "",
                "| dataset | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for ds, g in here.items():
            cells = []
            for a in arms:
                rs = g.get(a, [])
                cells.append("–" if not rs else f"{pct(mean_test(rs))} / {pct(mean_test(rs, 'AP50'))}"
                             + (f" ({len(rs)})" if len(rs) > 1 else ""))
            out.append(f"| {ds} | " + " | ".join(cells) + " |")
    return out


def recipe_summary(groups: Groups) -> list[str]:
    """Issue 13's targets from the rows there are, per kind of CPU and L: the recipe's K-Net against YOLO, Mask
    R-CNN and the old defaults on the datasets where both arms have rows (means over seeds, then datasets)."""
    out: list[str] = []
    level = level_of(groups)
    for cpu, size, tag in sorted({(k[2], level[k], t) for k in groups for t in recipe_tags(groups)}):
        here = [(k[0], g) for k, g in sorted(groups.items())
                if k[2] == cpu and level[k] == size and f"knet{tag}" in g]
        if here:
            parts = []
            for peer, metric in (("yolo", "AP"), (f"maskrcnn{tag}", "AP"), ("knet_old", "AP50")):
                both = [same_seeds(g, f"knet{tag}", peer) for _, g in here if same_seeds(g, f"knet{tag}", peer)]
                if not both:
                    continue
                ours = [mean_test([a for a, _ in pairs], metric) for pairs in both]
                theirs = [mean_test([b for _, b in pairs], metric) for pairs in both]
                wins = sum(a >= b for a, b in zip(ours, theirs))
                mine, peers = statistics.mean(ours), statistics.mean(theirs)
                ratio = f" ({mine / peers:.2f}x)" if peers >= 0.01 else ""  # no ratio of a near-zero peer
                parts.append(f"vs `{peer}` ({metric}): >= on {wins} of {len(both)}, mean {pct(mine)} vs "
                             f"{pct(peers)}{ratio}")
            if parts:
                out.append(f"- {cpu}, L={size}{' (or all)' if size == '100' else ''}: `knet{tag}` " + "; ".join(parts)
                           + ".")
    return ["", "The recipe against the other arms (same CPU, same L, same recipe version, on the seeds both ran):",
            ""] + out if out else []


def recipe_tags(groups: Groups) -> list[str]:
    """The label suffixes of the recipe versions present: "" (the current one), then "@r1", ..."""
    return sorted({"@" + a.split("@")[1] if "@" in a else "" for g in groups.values() for a in g}, key=recipe_age)


def same_seeds(g: dict[str, list[dict[str, Any]]], arm: str, peer: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(arm's run, peer's run) pairs of one dataset and L with the same seed: the seed picks the labelled
    subset, so an arm is compared with a peer on the seeds both ran."""
    theirs = {r["seed"]: r for r in g.get(peer, [])}
    return [(r, theirs[r["seed"]]) for r in g.get(arm, []) if r["seed"] in theirs]


def uplvp_summary(groups: Groups) -> list[str]:
    """Issue 14's targets from the rows there are, per UPLVP arm and kind of CPU, on the seeds that both it and
    vanilla K-Net ran: its mean test AP over those datasets (ratio per L), on how many it reaches vanilla's final
    AP in at most half of vanilla's fine-tuning minutes, and on how many it is >= Mask R-CNN (same seeds)."""
    out: list[str] = []
    level = level_of(groups)
    for arm, tag in [(a + t, t) for t in recipe_tags(groups) for a in ARMS if a.startswith("uplvp")]:
        for cpu, size in sorted({(k[2], level[k]) for k in groups}):
            both = [(k[0], same_seeds(g, arm, f"knet{tag}"), g) for k, g in sorted(groups.items())
                    if k[2] == cpu and level[k] == size and same_seeds(g, arm, f"knet{tag}")]
            if not both:
                continue
            ours = statistics.mean(mean_test([u for u, _ in pairs]) for _, pairs, _ in both)
            vanilla = statistics.mean(mean_test([v for _, v in pairs]) for _, pairs, _ in both)
            fast = 0
            for _, pairs, _ in both:
                u, v = pairs[0]
                reach = minutes_to_reach(u["curve"], v["test"]["segm"]["AP"] or 0.0) if u["curve"] else None
                fast += reach is not None and reach <= 0.5 * v["train_minutes"]
            vs_mrcnn = [(ds, same_seeds(g, arm, f"maskrcnn{tag}")) for ds, _, g in both
                        if same_seeds(g, arm, f"maskrcnn{tag}")]
            wins = sum(mean_test([u for u, _ in p]) >= mean_test([m for _, m in p]) for _, p in vs_mrcnn)
            ratio = f"{ours / vanilla:.2f}x" if vanilla > 0 else "–"
            out.append(f"- `{arm}` on {cpu} at L={size}{' (or all)' if size == '100' else ''}, {len(both)} dataset(s) "
                       f"with a knet{tag} run of the same seed ({', '.join(ds for ds, _, _ in both)}): mean AP {pct(ours)} vs vanilla "
                       f"{pct(vanilla)} ({ratio}); reaches vanilla's final AP within half its minutes on {fast} of "
                       f"{len(both)}; >= Mask R-CNN on {wins} of {len(vs_mrcnn)}.")
    return ["", "UPLVP against vanilla K-Net, on the seeds both ran (the first such seed for the curves):", ""] + out \
        if out else []


def plot(groups: Groups) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in sorted(groups) if any(a in groups[k] for a in ARMS)]  # the current recipe's curves
    if not keys:
        return
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    colours = dict(zip(ARMS, (f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink",
                                                     "gray", "olive", "cyan"))))
    for ax, key in zip(axes.flat, keys):
        for arm in ARMS:
            for r in groups[key].get(arm, [])[:1]:
                if r["curve"]:
                    ax.plot([c["minutes"] for c in r["curve"]], [100 * (c["test_AP"] or 0) for c in r["curve"]],
                            marker="o", ms=3, label=arm, color=colours[arm])
                else:  # YOLO keeps no per-evaluation weights: its final point
                    ax.plot([r["train_minutes"]], [100 * (r["test"]["segm"]["AP"] or 0)], marker="*", ms=10,
                            ls="", label=arm, color=colours[arm])
        ax.set_title(f"{key[0]} L={key[1]} ({key[2]})")
        ax.set_xlabel("fine-tuning minutes (pre-training not included)")
        ax.set_ylabel("test mask AP (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(OUT / "real.png", dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--sizes", nargs="+", default=["100"], help="labelled sizes L (numbers or 'all')")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--budget", type=float, default=10.0, help="training minutes per arm")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--restore", type=Path, metavar="REAL_JSON",
                   help="first put this report JSON's runs back as result files (e.g. bench/results/real.json)")
    p.add_argument("--dry-run", action="store_true", help="list the arms this machine would run, and run none")
    p.add_argument("--run-one", nargs=4, metavar=("DATASET", "L", "SEED", "ARM"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_one:
        ds, size, seed, arm = args.run_one
        run_one(ds, size, int(seed), arm, args.budget)
        return 0
    if args.restore:
        print(f"restored {restore(args.restore)} run(s) from {args.restore} into {WORK}")
    if not args.report_only:
        if not LOWDATA.is_dir():
            raise SystemExit(f"benchmark data not found at {LOWDATA} (set UPLVP_BENCH_DATA to the shared/data folder)")
        todo = []
        for seed in args.seeds:
            for size in args.sizes:
                for ds in args.datasets:
                    n_train = len(load_json(LOWDATA / ds / "annotations" / "train.json")["images"])
                    size_eff = "all" if size != "all" and int(size) >= n_train else size  # "L = 100 (or all, if fewer)"
                    todo += [(ds, size_eff, seed, arm) for arm in args.arms
                             if not (WORK / run_name(ds, size_eff, seed, arm) / "result.json").is_file()]
        if args.dry_run:
            for t in todo:
                print(run_name(*t))
            # each arm: its budget, plus data preparation and the scoring of its evaluations on test (~2 min)
            print(f"{len(todo)} arm(s) to run on this {ISA} machine, about {len(todo) * (args.budget + 2) / 60:.1f} h")
            return 0
        for ds, size_eff, seed, arm in todo:
            print(f"=== {run_name(ds, size_eff, seed, arm)} ({args.budget:g} min)", flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--budget", str(args.budget),
                            "--run-one", ds, str(size_eff), str(seed), arm], cwd=ROOT, env=env, check=False)
    report(collect())
    return 0


if __name__ == "__main__":
    sys.exit(main())
