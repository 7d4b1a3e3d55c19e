"""The fine-tuning and segmentation pipelines the service runs, as plain functions.

No Redis, no Celery, no HTTP: paths, parameters and a hooks object in, results out. The
worker (worker/tasks.py) wraps these with progress reporting and cancellation; anything else
(a script, a notebook, a test) can call them directly.

Fine-tuning: dataset dir -> optional train/val split -> deep validation (CocoAnnotations) ->
build the model (optionally initialised from a base checkpoint) -> train with hooks ->
evaluate -> export a serving artifact (the checkpoint without optimizer state). The working
checkpoint in `work_dir` is written every epoch, so calling `run_finetune` again with the same
`work_dir` resumes where an interrupted run stopped.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.errors import ConfigError, DataError

Stage = str  # "validating" | "proposing" | "pretraining" | "finetuning" | "evaluating"
EVAL_EVERY_EPOCH_MAX = 100  # val images up to which every epoch is evaluated (AP per epoch in the curves)


@dataclass
class FinetuneParams:
    """Everything a fine-tuning job may set. Defaults are the CLI's (`uplvp finetune`).

    width / kernels / stages / backbone_weights shape the model; small values (e.g. 32 / 8 / 1 /
    "none") give a model that trains in seconds, which the service tests use.
    """

    epochs: int = 12
    image_size: int = 384  # short side after resize
    max_size: int = 640  # cap on the long side
    batch_size: int = 2
    lr: float = 1e-4
    warmup_iters: int = 100
    seed: int = 0
    val_fraction: float = 0.2  # used when the dataset has no val split of its own
    width: int = 128
    kernels: int = 50
    stages: int = 3
    backbone_weights: str = "imagenet"
    threads: int = 0  # torch threads (0: torch's default)
    # UPLVP: propose pseudo masks on the dataset's images (vocabulary = its category names) and
    # pre-train the kernels on them before fine-tuning (the paper's pipeline, on the user's own photos).
    pretrain: bool = False
    pretrain_epochs: int = 0  # 0: as many as `epochs`
    proposal_engine: str = "offline"  # offline | clip (needs UPLVP_CLIP_PRETRAINED) | grid | saliency
    max_masks: int = 10  # pseudo masks per image at most

    def validate(self) -> FinetuneParams:
        """Raise ConfigError naming the first invalid field."""
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.backbone_weights not in ("imagenet", "none"):
            raise ConfigError(f"backbone_weights must be 'imagenet' or 'none', got {self.backbone_weights!r}")
        if self.pretrain_epochs < 0 or self.max_masks < 1:
            raise ConfigError("pretrain_epochs must be >= 0 and max_masks >= 1")
        self.train_config().validate()
        return self

    def pretrain_config(self) -> Any:
        """The TrainConfig of the UPLVP pre-training (the reference's gradient clip of 1.0)."""
        from models.config import TrainConfig

        return TrainConfig(epochs=self.pretrain_epochs or self.epochs, batch_size=self.batch_size, lr=self.lr,
                           warmup_iters=self.warmup_iters, seed=self.seed, short_side=self.image_size,
                           max_long_side=self.max_size, num_threads=self.threads, grad_clip=1.0)

    def model_config(self, num_classes: int) -> Any:
        """The K-Net ModelConfig these parameters describe."""
        from models.config import ModelConfig

        return ModelConfig(arch="knet", num_classes=num_classes, backbone_weights=self.backbone_weights,  # type: ignore[arg-type]
                           width=self.width, num_kernels=self.kernels, num_stages=self.stages,
                           gn_groups=min(32, self.width // 4) if self.width < 128 else 32,
                           ffn_dim=4 * self.width).validate()

    def train_config(self) -> Any:
        """The TrainConfig of this run (evaluation happens once, after training)."""
        from models.config import TrainConfig

        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           warmup_iters=self.warmup_iters, seed=self.seed, short_side=self.image_size,
                           max_long_side=self.max_size, num_threads=self.threads, eval_every=self.epochs)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneParams:
        """Build from a dict, ignoring unknown keys."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class PipelineHooks:
    """Progress and cancellation callbacks; every one is optional."""

    on_stage: Callable[[Stage], None] | None = None
    on_proposal: Callable[[int, int], None] | None = None  # (images done, images in all) while proposing
    on_step: Callable[[int, int, int, dict[str, float]], None] | None = None  # (epoch, step, steps, losses)
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    should_stop: Callable[[], bool] | None = None  # checked before each stage and every training step


@dataclass
class FinetuneResult:
    """What a finished fine-tune produced."""

    artifact: Path  # serving checkpoint (no optimizer state)
    metrics: dict[str, Any]  # {"segm", "class_agnostic", "per_category", "evaluated_on", "num_images"}
    history: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    num_train_images: int
    num_val_images: int
    init_report: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    resumed_from_epoch: int = 0  # > 0 when an interrupted run was continued from its checkpoint
    reports: dict[str, Path] = field(default_factory=dict)  # "curves" / "evaluation" -> PNG (models.reports)


def split_train_val(ann_file: str | Path, val_fraction: float, seed: int, out_dir: str | Path) -> tuple[Path, Path | None]:
    """Split a COCO file by image into ``train.json`` / ``val.json`` under `out_dir` (deterministic in `seed`).

    At least one image stays in train; with val_fraction 0 or a single image there is no val
    split (returns (train, None)). Both files keep the full category list, so the class
    indices never depend on the split.
    """
    ann_file, out_dir = Path(ann_file), Path(out_dir)
    try:
        raw = json.loads(ann_file.read_bytes())
        images = list(raw["images"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{ann_file}: cannot read as COCO ({exc})") from None
    n = len(images)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    if n_val == 0:
        return ann_file, None
    order = sorted(images, key=lambda im: str(im.get("id")))
    random.Random(seed).shuffle(order)
    val_ids = {im["id"] for im in order[:n_val]}

    def subset(keep_val: bool) -> dict:
        ims = [im for im in images if (im["id"] in val_ids) == keep_val]
        ids = {im["id"] for im in ims}
        return {**raw, "images": ims, "annotations": [a for a in raw.get("annotations", [])
                                                       if isinstance(a, dict) and a.get("image_id") in ids]}

    train_path, val_path = out_dir / "train.json", out_dir / "val.json"
    train_path.write_text(json.dumps(subset(False)))
    val_path.write_text(json.dumps(subset(True)))
    return train_path, val_path


def _check_stop(hooks: PipelineHooks) -> None:
    from models.train import TrainingCancelled

    if hooks.should_stop and hooks.should_stop():
        raise TrainingCancelled("cancelled between stages")


def _stage(hooks: PipelineHooks, stage: Stage) -> None:
    _check_stop(hooks)
    if hooks.on_stage:
        hooks.on_stage(stage)


def run_finetune(
    train_ann: str | Path,
    train_images: str | Path,
    work_dir: str | Path,
    params: FinetuneParams,
    val_ann: str | Path | None = None,
    val_images: str | Path | None = None,
    init: str | Path | None = None,
    hooks: PipelineHooks | None = None,
    unlabeled: str | Path | None = None,
) -> FinetuneResult:
    """Fine-tune K-Net on a COCO dataset; resumable through `work_dir`.

    Without a val split, `params.val_fraction` of the images are held out (deterministically);
    with no held-out image at all the metrics are computed on the training images and
    ``metrics["evaluated_on"]`` says so. `init` is a base checkpoint (any earlier model, or a
    UPLVP pre-training): its architecture (width, kernels, stages) is kept, only the number of
    classes follows this dataset. With `params.pretrain`, UPLVP pre-training runs first on the
    training images plus the folder `unlabeled` (extra unlabeled photos), if given.
    Raises DataError / ConfigError / CheckpointError for problems the user can fix and
    models.train.TrainingCancelled when `hooks.should_stop` turns true.
    """
    import torch

    from models.build import build_model
    from models.checkpoint import init_from, load_checkpoint, save_checkpoint
    from models.data import CategoryMap, CocoAnnotations, CocoDataset, TransformConfig
    from models.inference import Predictor, evaluate_model
    from models.reports import evaluation_grid_png, learning_curve_png
    from models.train import TrainHooks, train

    hooks = hooks or PipelineHooks()
    params.validate()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "checkpoint.pt"

    _stage(hooks, "validating")
    if val_ann is None and params.val_fraction > 0:
        train_ann, val_ann = split_train_val(train_ann, params.val_fraction, params.seed, work / "split")
        val_images = train_images if val_ann is not None else None
    resume = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    tcfg = params.train_config().validate()
    if resume is not None:
        categories = CategoryMap.from_coco(resume["categories"])
        train_set_ann = CocoAnnotations(train_ann, train_images, categories=categories)
        mcfg = resume["model_config"]
    else:
        train_set_ann = CocoAnnotations(train_ann, train_images)
        categories = train_set_ann.categories
        mcfg = params.model_config(len(categories))
        if init is not None:  # the base's architecture, so that its weights fit
            mcfg = dataclasses.replace(load_checkpoint(init)["model_config"], num_classes=len(categories),
                                       backbone_weights=params.backbone_weights).validate()
    eval_ann = (CocoAnnotations(val_ann, val_images, categories=categories)
                if val_ann is not None and val_images is not None else train_set_ann)
    train_set = CocoDataset(train_set_ann, TransformConfig(tcfg.short_side, tcfg.max_long_side), train=True)
    if len(train_set) == 0:
        raise DataError(f"{train_ann}: no training image has an annotation; nothing to learn from")

    if params.pretrain and resume is None:
        folders = [Path(train_images)] + ([Path(unlabeled)] if unlabeled is not None else [])
        init = run_uplvp_pretraining(folders, list(categories.names), work / "pretrain", params, hooks)

    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg, tcfg.short_side, tcfg.max_long_side)
    init_report = None
    if init is not None and resume is None:
        init_report = init_from(model, init, categories.to_coco())

    # Validation AP per epoch for the learning curve when the val set is small enough to be cheap
    # (<= EVAL_EVERY_EPOCH_MAX images); otherwise about six times over the run. The last epoch is
    # always evaluated, and that evaluation is the result's metrics.
    eval_set = CocoDataset(eval_ann, TransformConfig(tcfg.short_side, tcfg.max_long_side, flip_prob=0.0), train=False)
    last: dict[str, Any] = {}

    def evaluate_epoch(m: Any) -> dict[str, Any]:
        last.clear()
        last.update(evaluate_model(m, eval_ann, eval_set, batch_size=tcfg.batch_size, mask_threshold=mcfg.mask_threshold))
        return last

    every = 1 if len(eval_ann.images) <= EVAL_EVERY_EPOCH_MAX else max(1, tcfg.epochs // 6)
    tcfg = dataclasses.replace(tcfg, eval_every=every)
    _stage(hooks, "finetuning")
    state = train(model, train_set, mcfg, tcfg, categories.to_coco(), out=ckpt_path, resume=resume,
                  evaluate=evaluate_epoch,
                  hooks=TrainHooks(on_step=hooks.on_step, on_epoch=hooks.on_epoch, should_stop=hooks.should_stop,
                                   progress=False),
                  extra={"params": asdict(params), "init": str(init) if init else None})

    _stage(hooks, "evaluating")
    metrics = dict(last) if last else evaluate_model(model, eval_ann, eval_set, batch_size=tcfg.batch_size,
                                                     mask_threshold=mcfg.mask_threshold)
    metrics["evaluated_on"] = "val" if eval_ann is not train_set_ann else "train"
    _check_stop(hooks)  # a cancel during evaluation: no version is produced
    artifact = save_checkpoint(work / "model.pt", model, mcfg, tcfg, categories.to_coco(), state.history,
                               extra={"params": asdict(params), "metrics": metrics})
    reports = {"curves": learning_curve_png(state.history, work / "curves.png"),
               "evaluation": evaluation_grid_png(Predictor(artifact, params.threads), eval_ann,
                                                 work / "evaluation.png")}
    return FinetuneResult(artifact=artifact, metrics=metrics, history=state.history, categories=categories.to_coco(),
                          num_train_images=len(train_set_ann.images),
                          num_val_images=len(eval_ann.images) if eval_ann is not train_set_ann else 0,
                          init_report=init_report, params=asdict(params),
                          resumed_from_epoch=int(resume["epoch"]) if resume is not None else 0, reports=reports)


def image_pool(folders: list[Path], pool: Path) -> Path:
    """One folder that holds the images of several (symlinks under pool/<i>/...); one folder is used as is."""
    from models.proposals import list_images_recursive

    if len(folders) == 1:
        return folders[0]
    for i, folder in enumerate(folders):
        for f in list_images_recursive(folder):
            link = pool / str(i) / f.relative_to(folder)
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f.resolve())
    return pool


def run_uplvp_pretraining(
    images: str | Path | list[Path],
    vocabulary: list[str],
    work_dir: str | Path,
    params: FinetuneParams,
    hooks: PipelineHooks | None = None,
) -> Path:
    """UPLVP on the images of a folder (or several): Masks Proposal, then prompt-kernel pre-training.

    Both steps are resumable in `work_dir` (``pseudo.json`` with its partial file, and
    ``pretrain.pt``). Returns the pre-trained checkpoint, for `run_finetune(init=...)`.
    """
    import torch

    from models.build import build_model
    from models.checkpoint import load_checkpoint
    from models.data import TransformConfig
    from models.pretrain import load_pseudo, pretrain
    from models.prompts import PromptConfig
    from models.proposals import build_engine, propose_folder
    from models.train import TrainHooks, TrainingCancelled

    hooks = hooks or PipelineHooks()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    images = image_pool([Path(f) for f in images] if isinstance(images, list) else [Path(images)], work / "pool")
    pseudo, ckpt = work / "pseudo.json", work / "pretrain.pt"
    if not pseudo.is_file():
        _stage(hooks, "proposing")
        if params.threads:
            torch.set_num_threads(params.threads)
        engine = build_engine(params.proposal_engine, vocabulary)
        propose_folder(images, engine, pseudo.with_suffix(".tmp.json"), max_masks=params.max_masks,
                       progress=hooks.on_proposal, should_stop=hooks.should_stop)
        if hooks.should_stop and hooks.should_stop():
            raise TrainingCancelled("cancelled while proposing pseudo masks")
        pseudo.with_suffix(".tmp.json").replace(pseudo)
    _stage(hooks, "pretraining")
    tcfg = params.pretrain_config().validate()
    dataset, summary = load_pseudo(pseudo, images, TransformConfig(tcfg.short_side, tcfg.max_long_side))
    categories = dataset.ann.categories
    resume = load_checkpoint(ckpt) if ckpt.is_file() else None
    mcfg = resume["model_config"] if resume else params.model_config(len(categories))
    prompt_cfg = PromptConfig(num_slots=min(params.max_masks, mcfg.num_kernels))
    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg, tcfg.short_side, tcfg.max_long_side)
    pretrain(model, dataset, mcfg, tcfg, prompt_cfg, categories.to_coco(), out=ckpt, resume=resume,
             hooks=TrainHooks(on_step=hooks.on_step, on_epoch=hooks.on_epoch, should_stop=hooks.should_stop,
                              progress=False),
             extra={"pseudo": str(pseudo), "engine": params.proposal_engine, **summary})
    return ckpt


@dataclass
class PretrainResult:
    """What a finished UPLVP pre-training produced (a checkpoint to fine-tune from)."""

    artifact: Path  # serving checkpoint (no optimizer state)
    metrics: dict[str, Any]  # {"pretrain": {epochs, loss_first, loss_last, images_per_s, pseudo_masks, images}}
    categories: list[dict[str, Any]]  # the vocabulary, as COCO categories
    num_images: int
    params: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, Path] = field(default_factory=dict)  # "curves" -> PNG


def run_pretrain(
    images: str | Path,
    vocabulary: str | list[str],
    work_dir: str | Path,
    params: FinetuneParams,
    hooks: PipelineHooks | None = None,
) -> PretrainResult:
    """UPLVP pre-training alone (POST /pretrain): pseudo masks on `images` for `vocabulary`
    ("coco", "cat,dog" or a list of names), pre-training, and a serving checkpoint whose class
    head carries the vocabulary (it transfers when a fine-tune's categories are the same names)."""
    from models.checkpoint import export_for_serving, load_checkpoint
    from models.proposals import parse_vocabulary
    from models.reports import learning_curve_png

    hooks = hooks or PipelineHooks()
    params.validate()
    if isinstance(vocabulary, str):  # a built-in name or comma-separated names, never a path: it comes from a request
        vocabulary = vocabulary.strip() if vocabulary.strip().lower() == "coco" else vocabulary.split(",")
    names = parse_vocabulary(vocabulary)
    params = dataclasses.replace(params, pretrain=True)
    ckpt = run_uplvp_pretraining(Path(images), names, Path(work_dir) / "pretrain", params, hooks)
    state = load_checkpoint(ckpt)
    history = state["history"]
    summary = state["extra"].get("pretrain", {})
    metrics = {"pretrain": {"epochs": len(history), "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
                            "images_per_s": history[-1].get("images_per_s"),
                            "pseudo_masks": summary.get("pseudo_masks"), "images": summary.get("images"),
                            "engine": params.proposal_engine}}
    artifact = export_for_serving(ckpt, Path(work_dir) / "model.pt")
    curves = learning_curve_png(history, Path(work_dir) / "curves.png")
    return PretrainResult(artifact=artifact, metrics=metrics, categories=state["categories"],
                          num_images=int(summary.get("images") or 0), params=asdict(params), reports={"curves": curves})


# --------------------------------------------------------------------------- segmentation


def decode_image(data: bytes, name: str = "image") -> Any:
    """Bytes of an image file -> RGB PIL image (EXIF orientation applied); DataError if undecodable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001 - a broken EXIF block should not make a good photo unusable
                pass
            return im.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{name}: cannot decode image ({exc})") from None


class PredictorCache:
    """Loaded models kept in memory, least recently used evicted first.

    Keyed by anything hashable that changes when the model does, e.g. (artifact key, sha256),
    so a replaced checkpoint is reloaded; `locate()` is called only on a miss, which is where
    a store downloads or verifies the file.
    """

    def __init__(self, capacity: int = 4, num_threads: int = 0) -> None:
        self.capacity = max(1, capacity)
        self.num_threads = num_threads
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, locate: Callable[[], str | Path] | None = None) -> Any:
        """The Predictor for `key`, loading `locate()` (default: `key` is the checkpoint path) on a miss."""
        from models.inference import Predictor

        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        predictor = Predictor(locate() if locate is not None else key, num_threads=self.num_threads)
        self._items[key] = predictor
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return predictor

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[Any]:
        """Cached keys, least recently used first."""
        return list(self._items)


def segment(
    predictor: Any,
    images: list[tuple[str, bytes]],
    score_threshold: float = 0.3,
    fmt: str = "json",
) -> list[dict[str, Any]]:
    """Segment (name, bytes) images with a Predictor.

    fmt "json": per image {"file_name", "width", "height", "instances": [{category_id,
    category_name, score, bbox, area, segmentation (RLE), polygons}]}.
    fmt "png": per image {"file_name", "png_base64"}: the overlay drawn by models.visualize.
    """
    from models.visualize import draw_overlay

    if fmt not in ("json", "png"):
        raise ConfigError(f"format must be 'json' or 'png', got {fmt!r}")
    decoded = [decode_image(data, name) for name, data in images]
    preds = predictor.predict_images(decoded, score_threshold, with_polygons=(fmt == "json"))
    out: list[dict[str, Any]] = []
    for (name, _), img, instances in zip(images, decoded, preds):
        if fmt == "json":
            out.append({"file_name": name, "width": img.width, "height": img.height, "instances": instances})
        else:
            buf = io.BytesIO()
            draw_overlay(img, instances).save(buf, format="PNG")
            out.append({"file_name": name, "png_base64": base64.b64encode(buf.getvalue()).decode("ascii")})
    return out
