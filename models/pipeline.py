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
import math
import random
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.errors import ConfigError, DataError

Stage = str  # "validating" | "teaching" | "proposing" | "pretraining" | "finetuning" | "evaluating"
EVAL_EVERY_EPOCH_MAX = 100  # val images up to which every epoch is evaluated (AP per epoch in the curves)
MAX_BUDGET_EPOCHS = 10_000  # a budgeted run's epoch cap when none is given: the budget decides
# A budgeted UPLVP job (FinetuneParams.pretrain) shares its one budget: the `self` engine's teacher,
# then the proposals (at most PROPOSAL_SHARE: a pool of a thousand photos at ~1 image/s would
# otherwise eat the whole budget; a uniform sample of it is proposed instead), then pre-training,
# then the fine-tuning gets the rest.
TEACHER_SHARE, PROPOSAL_SHARE, PRETRAIN_SHARE = 0.35, 0.15, 0.25
MIN_KERNELS = 50
# image_size 0 follows the data (image_size_for): the short side that makes the median instance
# OBJECT_PX pixels across, between AUTO_SIZE_MIN and AUTO_SIZE_MAX. A CPU's cost grows with the square of
# the size, so above CROP_PX training sees random CROP_PX x CROP_PX windows of the image (FinetuneParams.crop):
# the objects keep their size and a step costs what one at CROP_PX does; evaluation sees the whole image.
OBJECT_PX = 32
AUTO_SIZE_MIN, AUTO_SIZE_MAX = 320, 1024
CROP_PX = 640


def auto_steps(num_images: int) -> int:
    """Training steps when neither epochs nor a budget are given: ~1500 for 100 images, growing
    with the square root of the dataset's size (small sets need more epochs, large ones fewer),
    within 600..4000."""
    return int(min(4000, max(600, 1500 * math.sqrt(max(1, num_images) / 100))))


def kernels_for(max_instances: int) -> int:
    """Kernels for a dataset whose fullest image has `max_instances` instances: 50, or a quarter
    more than that count (rounded up to a multiple of 10), so every instance has a kernel and
    the Hungarian matching still has spares to choose from."""
    return max(MIN_KERNELS, int(math.ceil(1.25 * max_instances / 10) * 10))


def image_size_for(annotations: Any) -> int:
    """The short side for image_size 0: the median instance (the square root of its area, relative to
    its image's short side) becomes OBJECT_PX pixels across, rounded up to a multiple of 32, within
    AUTO_SIZE_MIN..AUTO_SIZE_MAX and never more than twice the images' median short side.

    At the fixed 320 a nucleus of a 260-px microscopy tile is ~2 cells of the stride-8 grid and a
    10-px insect on a 576-px photo a fraction of one; a balloon or an animal stays at 320. Above
    CROP_PX (tiny objects on large photos) training crops windows of the image (FinetuneParams.crop)."""
    rel, shorts = [], []
    for im in annotations.images:
        short = min(im["height"], im["width"])
        shorts.append(short)
        rel += [math.sqrt(a["area"]) / short for a in annotations.annotations_for(im["id"])
                if not a["iscrowd"] and a["area"] > 0]
    if not rel:
        return AUTO_SIZE_MIN
    want = OBJECT_PX / statistics.median(rel)
    cap = max(AUTO_SIZE_MIN, 2 * statistics.median(shorts))
    return int(min(AUTO_SIZE_MAX, cap, max(AUTO_SIZE_MIN, math.ceil(want / 32) * 32)))


def long_side_for(short_side: int) -> int:
    """The long-side cap that goes with a short side: 5/3 of it (320 -> 533, a 16:9 photo fits)."""
    return max(short_side, round(short_side * 5 / 3))


@dataclass
class FinetuneParams:
    """Everything a fine-tuning job may set; the defaults are the low-data recipe (README, "The recipe").

    The schedule: `time_budget_min` > 0 lays the run out for that many minutes (evaluations
    included; `epochs` then only caps it); else `epochs` > 0 runs that many; else the number of
    steps follows the dataset's size (`auto_steps`). `kernels` 0 follows the data: at least 50,
    and more than the most instances in one training image. width / kernels / stages /
    backbone_weights shape the model; small values (e.g. 32 / 8 / 1 / "none") give a model that
    trains in seconds, which the service tests use.
    """

    arch: str = "knet"  # knet | maskrcnn (the CNN reference, same backbone and loop)
    epochs: int = 0  # 0: from the budget, or from the dataset's size
    time_budget_min: float = 0.0  # 0: no budget
    image_size: int = 0  # short side after resize; 0 follows the data (image_size_for): 320 unless objects are small
    max_size: int = 0  # cap on the long side; 0 (or any, with image_size 0): long_side_for the short side
    batch_size: int = 0  # images per step; 0: follows the device (2 on the CPU, 8 on a GPU, 16 from 40 GB)
    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup_iters: int = 50
    lr_steps: tuple[float, ...] = (0.8, 0.95)  # fractions of the run where lr *= 0.1
    grad_clip: float = 4.0
    seed: int = 0
    val_fraction: float = 0.2  # used when the dataset has no val split of its own
    eval_every: int = 0  # epochs between evaluations; 0: every epoch for small val sets, else ~6 times
    early_stop_patience: int = 0  # evaluations without a better val AP before stopping (0: never)
    keep_best: bool = True  # the version is the evaluation with the best val AP, not the last step
    # EMA of the weights, its decay (0: off); evaluated, selected and kept (models.engine.train). L = 25, seed 0,
    # 10 min (bench/results/real_ablation.md): val AP balloon 36.0 -> 42.1, bottles 61.2 -> 64.3
    ema: float = 0.995
    # augmentation (training only): scale jitter range, photometric strength, copy-paste chance. Copy-paste
    # (bench/results/real_ablation.md, 10 min, seed 0): val AP bottles L=25 60.0 -> 73.5, rice_leaf 19.1 -> 19.8,
    # balloon 36.7 -> 41.8
    scale_min: float = 0.75
    scale_max: float = 1.25
    photometric: float = 0.2
    copy_paste: float = 0.5
    # training on random crop x crop windows (px, after the resize) of images larger than that, each holding
    # an object: 0 follows the size (CROP_PX where the short side is above it, else none), -1 never
    crop: int = 0
    width: int = 128
    kernels: int = 0  # 0: follows the data (see class doc)
    stages: int = 3
    frozen_stages: int = 3  # MobileNetV2 stages with frozen weights
    light_p2: bool = True  # FPN P2 without its 3x3 output conv (models.config.ModelConfig)
    init_pool: str = "mean"  # initial kernel features: "sum" (reference) or "mean" (models.config.ModelConfig)
    init_kernel_std: float = 0.0  # initial kernels' weight std (models.config.ModelConfig; 0: 1/sqrt(width))
    one_to_many: int = 1  # kernels matched to each object before the last stage (models.nets.criterion)
    kernel_init: str = "centers"  # kernels start from predicted object centres, or "static" (models.config.ModelConfig)
    mask_stride: int = 8  # grid of the last stage's masks: 8, or 4 from FPN P2 (models.config.ModelConfig)
    neck_conv: str = "separable"  # the neck's 3x3 convs: "separable" or "full" (models.config.ModelConfig)
    # class logits also read ImageNet features under the mask (models.config.ModelConfig); None: when the
    # dataset has several classes (endangered_animals val AP 12.9 -> 46.1; one class, balloon: 31.7 -> 27.0)
    class_from_backbone: bool | None = None
    backbone_weights: str = "imagenet"
    mask_threshold: float = 0.5
    rescore: bool = True  # inference: class probability x mask quality
    nms: bool = True  # inference: Matrix NMS within a class
    threads: int = 0  # torch threads (0: torch's default)
    device: str = "auto"  # auto (CUDA when present, else the CPU) | cpu | cuda | cuda:N (models.engine.device)
    amp: bool | None = None  # mixed precision; None: on for CUDA, off on the CPU
    # UPLVP: propose pseudo masks on the dataset's images (vocabulary = its category names) and
    # pre-train the kernels on them before fine-tuning (the paper's pipeline, on the user's own photos).
    # With a time budget the whole job fits in it: the `self` engine's teacher takes TEACHER_SHARE of it,
    # the proposals at most PROPOSAL_SHARE (a seeded sample of the pool when it cannot all be proposed),
    # pre-training PRETRAIN_SHARE (capped by pretrain_epochs when given), the fine-tuning what is left.
    pretrain: bool = False
    pretrain_epochs: int = 0  # 0: as many as `epochs` (12 when those are planned; the budget's share with one)
    # offline | maskcut | self (a teacher fine-tuned on the labels proposes) | clip (needs
    # UPLVP_CLIP_PRETRAINED) | grid | saliency
    proposal_engine: str = "offline"
    max_masks: int = 10  # pseudo masks per image at most
    # proposal_engine "self": the score a teacher's mask needs to be a pseudo mask; None: the threshold of the best
    # F1 of the teacher's masks on the val images (models.uplvp.proposals.self_training.calibrate_min_score). Not
    # the default (bench/results/real_ablation.md, L = 25, seed 0): it cut at 0.16-0.27 and kept 1.3-135x the
    # masks, at a val precision of 0.50-0.92, and val AP fell on balloon (52.2 -> 45.7) and bottles (76.8 -> 75.6),
    # rose on endangered_animals (39.6 -> 43.2; its 0.5 cut kept 6 masks): mean 56.2 -> 54.8
    self_min_score: float | None = 0.5
    # proposal_engine "self": True starts the pre-training from the teacher's weights rather than from ImageNet
    # alone. Off by default (bench/results/real_ablation.md, L = 25, seed 0): val favoured ImageNet on balloon (52.2
    # vs 48.0) and bottles (76.8 vs 70.3), the teacher on endangered_animals (41.3 vs 39.6); a student that starts
    # as its teacher relearns the teacher's own masks
    student_from_teacher: bool = False
    # proposal_engine "self": pre-train only when the teacher kept at least this many pseudo masks per labelled
    # instance on the pool; fewer (but some), and the fine-tuning goes on from the teacher instead
    # (too_few_pseudo_masks; 0: always pre-train). 1 by default (bench/results/real_ablation.md, L = 100 (or all),
    # seed 0): where it skipped, val AP rose over pre-training on all six runs measured (e.g. endangered_animals
    # 43.8 -> 52.5, rice_leaf 9.7 -> 20.4, dsb2018_nuclei 17.3 -> 19.9, balloon 37.5 -> 38.2)
    self_min_pseudo_per_label: float = 1.0

    def validate(self) -> FinetuneParams:
        """Raise ConfigError naming the first invalid field."""
        from models.config import MIN_TIME_BUDGET_MIN

        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.arch not in ("knet", "maskrcnn"):
            raise ConfigError(f"arch must be 'knet' or 'maskrcnn', got {self.arch!r}")
        if self.pretrain and self.arch != "knet":
            raise ConfigError("UPLVP pre-training is for arch 'knet' (its kernels take the prompts)")
        if self.backbone_weights not in ("imagenet", "none"):
            raise ConfigError(f"backbone_weights must be 'imagenet' or 'none', got {self.backbone_weights!r}")
        if self.self_min_score is not None and not 0.0 <= self.self_min_score <= 1.0:
            raise ConfigError(f"self_min_score must be in [0, 1], got {self.self_min_score}")
        if self.self_min_pseudo_per_label < 0:
            raise ConfigError(f"self_min_pseudo_per_label must be >= 0, got {self.self_min_pseudo_per_label}")
        if self.pretrain_epochs < 0 or self.max_masks < 1 or self.epochs < 0 or self.kernels < 0:
            raise ConfigError("epochs, kernels and pretrain_epochs must be >= 0 and max_masks >= 1")
        if self.time_budget_min and self.time_budget_min < MIN_TIME_BUDGET_MIN:
            raise ConfigError(f"time_budget_min must be at least {MIN_TIME_BUDGET_MIN} (minutes: a few steps and "
                              f"one evaluation), got {self.time_budget_min}")
        if self.image_size < 0 or self.max_size < 0:
            raise ConfigError(f"image_size and max_size must be >= 32 (or 0: follow the data), got "
                              f"{self.image_size}, {self.max_size}")
        if self.batch_size < 0:
            raise ConfigError(f"batch_size must be >= 1 (or 0: follow the device), got {self.batch_size}")
        dataclasses.replace(self.with_size(self.image_size or AUTO_SIZE_MIN),
                            batch_size=self.batch_size or 1).train_config(100).validate()
        return self

    def on_device(self) -> FinetuneParams:
        """These parameters where they will run: `device` resolved on this machine (DeviceError when it asks
        for a GPU that is not here) and batch_size 0 replaced by the device's default."""
        from models.engine.device import default_batch_size, resolve_device

        device = resolve_device(self.device)
        name = f"{device.type}:{device.index}" if device.type == "cuda" else "cpu"
        return dataclasses.replace(self, device=name, batch_size=self.batch_size or default_batch_size(device))

    def with_size(self, short_side: int) -> FinetuneParams:
        """These parameters at `short_side`: max_size stays where both sizes were given, else it is
        long_side_for(short_side) (max_size 0, or image_size 0: the size follows the data)."""
        keep = bool(self.image_size and self.max_size)
        return dataclasses.replace(self, image_size=short_side,
                                   max_size=self.max_size if keep else long_side_for(short_side))

    def for_data(self, annotations: Any) -> FinetuneParams:
        """These parameters with what follows the data resolved: image_size 0 becomes image_size_for
        the training annotations (see with_size for max_size)."""
        return self.with_size(self.image_size or image_size_for(annotations))

    def pretrain_config(self, budget_min: float | None = None) -> Any:
        """The TrainConfig of the UPLVP pre-training (the reference's gradient clip of 1.0). Unlabeled
        images have no objects to size the images by: image_size 0 is AUTO_SIZE_MIN there. Its time
        budget is PRETRAIN_SHARE of the job's, or `budget_min` of its own (pre-training done once,
        outside a fine-tuning's budget: the benchmark's uncounted arms)."""
        from models.config import TrainConfig

        if not self.batch_size:  # the device's default batch
            return self.on_device().pretrain_config(budget_min)
        sized = self.with_size(self.image_size or AUTO_SIZE_MIN)
        budget_s = 60.0 * (self.time_budget_min * PRETRAIN_SHARE if budget_min is None else budget_min)
        epochs = self.pretrain_epochs or (MAX_BUDGET_EPOCHS if budget_s else self.epochs or 12)
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.lr,
                           warmup_iters=self.warmup_iters, seed=self.seed, short_side=sized.image_size,
                           max_long_side=sized.max_size, num_threads=self.threads, grad_clip=1.0,
                           time_budget_s=budget_s, device=self.device, amp=self.amp)

    def model_config(self, num_classes: int, max_instances: int = 0) -> Any:
        """The ModelConfig these parameters describe for a dataset with `num_classes` classes and at most
        `max_instances` instances in one image (kernels follow it; an explicit count below it is an error)."""
        from models.config import ModelConfig

        kernels = self.kernels or kernels_for(max_instances)
        if kernels < max_instances:
            raise ConfigError(f"kernels={self.kernels} cannot hold the {max_instances} instances of the fullest "
                              f"training image: use at least {max_instances}, or 0 to follow the data")
        return ModelConfig(arch=self.arch, num_classes=num_classes, mask_threshold=self.mask_threshold,  # type: ignore[arg-type]
                           backbone_weights=self.backbone_weights,  # type: ignore[arg-type]
                           width=self.width, num_kernels=kernels, num_stages=self.stages,
                           gn_groups=min(32, self.width // 4) if self.width < 128 else 32,
                           ffn_dim=4 * self.width, max_per_image=max(100, kernels),
                           frozen_backbone_stages=self.frozen_stages, light_p2=self.light_p2, init_pool=self.init_pool,
                           init_kernel_std=self.init_kernel_std, one_to_many=self.one_to_many,
                           kernel_init=self.kernel_init, mask_stride=self.mask_stride, neck_conv=self.neck_conv,
                           class_from_backbone=(num_classes > 1 if self.class_from_backbone is None
                                                else self.class_from_backbone),
                           rescore=self.rescore, nms=self.nms).validate()

    def train_config(self, num_images: int) -> Any:
        """The TrainConfig of this run on `num_images` training images (`eval_every` 0 is resolved by
        run_finetune from the val set's size)."""
        from models.config import TrainConfig

        if not self.batch_size:  # the device's default batch
            return self.on_device().train_config(num_images)
        per_epoch = math.ceil(num_images / self.batch_size)
        epochs = self.epochs or (MAX_BUDGET_EPOCHS if self.time_budget_min
                                 else math.ceil(auto_steps(num_images) / max(1, per_epoch)))
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                           warmup_iters=self.warmup_iters, lr_steps=tuple(self.lr_steps), grad_clip=self.grad_clip,
                           seed=self.seed, short_side=self.image_size, max_long_side=self.max_size,
                           num_threads=self.threads, eval_every=self.eval_every or epochs,
                           time_budget_s=60.0 * self.time_budget_min, early_stop_patience=self.early_stop_patience,
                           keep_best=self.keep_best, ema=self.ema, device=self.device, amp=self.amp)

    def transform(self, train: bool) -> Any:
        """The data transform: the augmentations when training, none for evaluation."""
        from models.data.transforms import TransformConfig

        if not train:
            return TransformConfig(self.image_size, self.max_size, flip_prob=0.0)
        crop = self.crop if self.crop > 0 else CROP_PX if self.crop == 0 and self.image_size > CROP_PX else 0
        return TransformConfig(self.image_size, self.max_size, scale_range=(self.scale_min, self.scale_max),
                               photometric=self.photometric, copy_paste=self.copy_paste, crop=crop)

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
    on_init: Callable[[dict[str, Any]], None] | None = None  # what loading `init` did (models.engine.checkpoint.init_from)
    on_evaluation: Callable[[Any, dict[str, Any]], None] | None = None  # (model, val metrics) after each evaluation
    on_plan: Callable[[dict[str, Any]], None] | None = None  # a training stage's layout (models.engine.train.TrainHooks)
    on_checkpoint: Callable[[Path], None] | None = None  # a training checkpoint was written (its path)
    progress: bool = False  # tqdm bars while training (the CLI)

    def train_hooks(self) -> Any:
        """The training loop's view of these hooks."""
        from models.engine.train import TrainHooks

        return TrainHooks(on_step=self.on_step, on_epoch=self.on_epoch, should_stop=self.should_stop,
                          on_evaluation=self.on_evaluation, on_plan=self.on_plan, on_checkpoint=self.on_checkpoint,
                          progress=self.progress)


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
    reports: dict[str, Path] = field(default_factory=dict)  # "curves" / "evaluation" -> PNG (models.reports.pictures)


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
    from models.engine.train import TrainingCancelled

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
    checkpoint: str | Path | None = None,
    resume: str | Path | None = None,
    export: bool = True,
    test_ann: str | Path | None = None,
    test_images: str | Path | None = None,
) -> FinetuneResult:
    """Fine-tune a model on a COCO dataset; what `POST /finetune` and `uplvp finetune` both run.

    Without a val split, `params.val_fraction` of the images are held out (deterministically);
    with no held-out image at all the metrics are computed on the training images and
    ``metrics["evaluated_on"]`` says so. `init` is a base checkpoint (any earlier model, or a
    UPLVP pre-training): its architecture (width, kernels, stages) is kept, only the number of
    classes follows this dataset. With `params.pretrain`, UPLVP pre-training runs first on the
    training images plus the folder `unlabeled` (extra unlabeled photos), if given.

    The working checkpoint (with optimizer state) is `checkpoint` (default ``work_dir/checkpoint.pt``,
    and then an existing one is resumed: the service's restart); `resume` continues from another
    checkpoint explicitly (the CLI's ``--resume``). With `export`, a serving artifact (``model.pt``,
    no optimizer state), its metrics (on the training images when there is no val set) and its
    report pictures are written to `work_dir`; without it the working checkpoint is the result.
    A test split (`test_ann`, `test_images`) never steers training or selection: the exported
    model is scored on it once, as ``metrics["test"]`` beside the selection split's numbers.
    Raises DataError / ConfigError / CheckpointError for problems the user can fix and
    models.engine.train.TrainingCancelled when `hooks.should_stop` turns true.
    """
    import torch

    from models.data.coco import CategoryMap, CocoAnnotations
    from models.data.dataset import CocoDataset
    from models.engine.checkpoint import init_from, load_checkpoint, save_checkpoint
    from models.engine.inference import Predictor, evaluate_model
    from models.engine.train import train
    from models.nets.build import build_model
    from models.reports.pictures import evaluation_grid_png, learning_curve_png

    from models.config import MIN_TIME_BUDGET_MIN

    from models.engine.device import device_info, precision_for

    job_t0 = time.monotonic()
    hooks = hooks or PipelineHooks()
    params = params.validate().on_device()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(checkpoint) if checkpoint is not None else work / "checkpoint.pt"
    if resume is None and checkpoint is None and ckpt_path.is_file():
        resume = ckpt_path

    _stage(hooks, "validating")
    if val_ann is None and params.val_fraction > 0:
        train_ann, val_ann = split_train_val(train_ann, params.val_fraction, params.seed, work / "split")
        val_images = train_images if val_ann is not None else None
    state = load_checkpoint(resume) if resume is not None else None
    if state is not None:
        categories = CategoryMap.from_coco(state["categories"])
        train_set_ann = CocoAnnotations(train_ann, train_images, categories=categories)
    else:
        train_set_ann = CocoAnnotations(train_ann, train_images)
        categories = train_set_ann.categories
    most = train_set_ann.max_instances()
    params = params.for_data(train_set_ann)
    tcfg = params.train_config(len(train_set_ann.images)).validate()
    if state is not None:
        mcfg = state["model_config"]
        # the image size a run started with is part of what it learnt
        # the image size a run started with is part of what it learnt, and its batch size part of its plan
        # (a job resumed on another kind of device keeps both)
        tcfg = dataclasses.replace(tcfg, short_side=state["train_config"].short_side,
                                   max_long_side=state["train_config"].max_long_side,
                                   batch_size=state["train_config"].batch_size)
    else:
        mcfg = params.model_config(len(categories), most)
        if init is not None and not params.pretrain:  # the base's architecture, so that its weights fit
            # ...but not its frozen stages, which are how it was trained, not what it is: a UPLVP pre-training
            # freezes the whole backbone, and a fine-tuning that kept that would train none of it
            mcfg = dataclasses.replace(load_checkpoint(init)["model_config"], num_classes=len(categories),
                                       backbone_weights=params.backbone_weights,
                                       frozen_backbone_stages=params.frozen_stages).validate()
            if mcfg.arch == "knet" and mcfg.num_kernels < most:
                raise ConfigError(f"the base model has {mcfg.num_kernels} kernels, but a training image here has "
                                  f"{most} instances: fine-tune from base 'none' (kernels follow the data) or "
                                  f"from a base with at least {most} kernels")
    eval_ann = (CocoAnnotations(val_ann, val_images, categories=categories)
                if val_ann is not None and val_images is not None else (train_set_ann if export else None))
    train_set = CocoDataset(train_set_ann, params.transform(train=True).with_size(tcfg.short_side, tcfg.max_long_side),
                            train=True)
    if len(train_set) == 0:
        raise DataError(f"{train_ann}: no training image has an annotation; nothing to learn from")

    if params.pretrain and state is None:
        folders = [Path(train_images)] + ([Path(unlabeled)] if unlabeled is not None else [])
        teacher, cut, sparse = None, None, None
        if params.proposal_engine == "self":
            if val_ann is None or val_images is None:
                raise ConfigError("proposal_engine=self fine-tunes a teacher on the labels first and needs held-out "
                                  "images to pick its checkpoint, but none could be held out: give a val split, "
                                  "more than one labelled image with val_fraction > 0, or another proposal_engine")
            teacher = train_teacher(train_ann, train_images, val_ann, val_images, work / "teacher", params, hooks)
            cut = teacher_min_score(teacher, val_ann, val_images, params)
        pre_params = dataclasses.replace(params, kernels=mcfg.num_kernels,
                                         **({"self_min_score": cut["min_score"]} if cut else {}))
        if teacher is not None:
            pseudo, _ = propose_pool(folders, list(categories.names), work / "pretrain", pre_params, hooks, teacher)
            sparse = too_few_pseudo_masks(pseudo_summary(pseudo)["pseudo_masks"], train_set_ann.num_instances(),
                                          params.self_min_pseudo_per_label)
        if sparse is not None:
            init = teacher  # the teacher already holds what its few masks would teach: fine-tune on from it
        else:
            init = run_uplvp_pretraining(folders, list(categories.names), work / "pretrain", pre_params, hooks,
                                         teacher=teacher)
        pretrain_minutes = round((time.monotonic() - job_t0) / 60, 2)
        if tcfg.time_budget_s:  # the fine-tuning gets what the teacher, proposals and pre-training left
            left = tcfg.time_budget_s - (time.monotonic() - job_t0)
            tcfg = dataclasses.replace(tcfg, time_budget_s=max(60.0 * MIN_TIME_BUDGET_MIN, left))
    uplvp = pseudo_summary(work / "pretrain" / "pseudo.json") if params.pretrain else None
    if uplvp is not None and state is None:  # pre-training ran in this call (a resumed job's did not)
        uplvp["minutes_before_finetuning"] = pretrain_minutes
        if params.proposal_engine == "self":
            uplvp["self_min_score"] = cut
            uplvp["pretraining_skipped"] = sparse

    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg, tcfg.short_side, tcfg.max_long_side)
    init_report = None
    if init is not None and state is None:
        init_report = init_from(model, init, categories.to_coco())
        if hooks.on_init:
            hooks.on_init(init_report)

    # Validation AP per epoch for the learning curve when the val set is small enough to be cheap
    # (<= EVAL_EVERY_EPOCH_MAX images); otherwise about six times over the run (a budgeted run
    # spreads its evaluations itself). The result's metrics are those of the evaluation whose
    # weights the version keeps: the best on val (params.keep_best), else the last.
    last: dict[str, Any] = {}
    evaluate_epoch = None
    if eval_ann is not None:
        eval_set = CocoDataset(eval_ann, params.transform(train=False).with_size(tcfg.short_side, tcfg.max_long_side),
                               train=False)

        def evaluate_epoch(m: Any) -> dict[str, Any]:
            last.clear()
            last.update(evaluate_model(m, eval_ann, eval_set, batch_size=tcfg.batch_size,
                                       mask_threshold=mcfg.mask_threshold))
            return dict(last)

        if not params.eval_every and not tcfg.time_budget_s:
            every = 1 if len(eval_ann.images) <= EVAL_EVERY_EPOCH_MAX else max(1, tcfg.epochs // 6)
            tcfg = dataclasses.replace(tcfg, eval_every=every)
    _stage(hooks, "finetuning")
    extra = {"params": asdict(params), "init": str(init) if init else None}
    run = train(model, train_set, mcfg, tcfg, categories.to_coco(), out=ckpt_path, resume=state,
                evaluate=evaluate_epoch, hooks=hooks.train_hooks(), extra=extra,
                eval_images=len(eval_ann.images) if eval_ann is not None else 0)
    tcfg = run.config or tcfg
    selected = run.best["metrics"] if run.best is not None and tcfg.keep_best else dict(last)
    training = {"steps": run.step, "epochs": run.epoch, "planned_steps": tcfg.max_steps or None,
                "time_budget_min": params.time_budget_min or None, "stopped": run.stopped,
                "selected_epoch": run.best["epoch"] if run.best is not None and tcfg.keep_best else run.epoch,
                "kernels": mcfg.num_kernels if mcfg.arch == "knet" else None, "max_instances_per_image": most,
                "image_size": [tcfg.short_side, tcfg.max_long_side], "uplvp": uplvp,
                "device": device_info(params.device), "precision": precision_for(params.device, params.amp).name,
                "batch_size": tcfg.batch_size,
                "train_time_s": round(sum(e.get("train_time_s", 0.0) + e.get("eval_time_s", 0.0)
                                          for e in run.history), 1)}

    num_val = len(eval_ann.images) if eval_ann is not None and eval_ann is not train_set_ann else 0
    result = FinetuneResult(artifact=ckpt_path, metrics={**selected, "training": training} if selected else {},
                            history=run.history, categories=categories.to_coco(),
                            num_train_images=len(train_set_ann.images), num_val_images=num_val,
                            init_report=init_report, params=asdict(params),
                            resumed_from_epoch=int(state["epoch"]) if state is not None else 0)
    if not export:
        return result
    _stage(hooks, "evaluating")
    metrics = dict(selected) if selected else evaluate_epoch(model)
    metrics["evaluated_on"] = "val" if eval_ann is not train_set_ann else "train"
    metrics["training"] = training
    if test_ann is not None and test_images is not None:
        test_set_ann = CocoAnnotations(test_ann, test_images, categories=categories)
        test_set = CocoDataset(test_set_ann, params.transform(train=False).with_size(tcfg.short_side,
                                                                                     tcfg.max_long_side), train=False)
        metrics["test"] = evaluate_model(model, test_set_ann, test_set, batch_size=tcfg.batch_size,
                                         mask_threshold=mcfg.mask_threshold)
    _check_stop(hooks)  # a cancel during evaluation: no version is produced
    artifact = save_checkpoint(work / "model.pt", model, mcfg, tcfg, categories.to_coco(), run.history,
                               extra={"params": asdict(params), "metrics": metrics})
    result.reports = {"curves": learning_curve_png(run.history, work / "curves.png"),
                      "evaluation": evaluation_grid_png(Predictor(artifact, params.threads, params.device), eval_ann,
                                                        work / "evaluation.png")}
    result.artifact, result.metrics = artifact, metrics
    return result


def image_pool(folders: list[Path], pool: Path) -> Path:
    """One folder that holds the images of several (symlinks under pool/<i>/...); one folder is used as is."""
    from models.uplvp.proposals import list_images_recursive

    if len(folders) == 1:
        return folders[0]
    for i, folder in enumerate(folders):
        for f in list_images_recursive(folder):
            link = pool / str(i) / f.relative_to(folder)
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f.resolve())
    return pool


def pseudo_summary(pseudo: Path) -> dict[str, Any] | None:
    """What a job's Masks Proposal made (None before it ran): the engine, the images of the pool, how many
    of them were proposed on (fewer when the proposals' share of a budget ran out) and the pseudo masks."""
    if not pseudo.is_file():
        return None
    coco = json.loads(pseudo.read_text())
    proposed = len(coco["images"])
    return {"engine": coco["info"]["engine"], "pseudo_masks": len(coco["annotations"]), "images_proposed": proposed,
            "pool_images": proposed + len(coco.get("skipped", [])) + coco["info"].get("images_not_reached", 0)}


def too_few_pseudo_masks(found: int, labelled: int, per_label: float) -> dict[str, Any] | None:
    """Why the `self` engine skips its pre-training (None: it does not): its teacher kept `found` pseudo masks
    on the pool, fewer than `per_label` x the `labelled` instances it learnt from, so a pre-training on them
    would teach less than the labels have already taught it, in time the fine-tuning needs more. No mask at
    all is not this case: pre-training then fails with no_pseudo_masks, as for every engine."""
    if not found or found >= per_label * labelled:
        return None
    return {"pseudo_masks": found, "labelled_instances": labelled, "per_label": per_label,
            "instead": "fine-tuned on from the teacher"}


def train_teacher(
    train_ann: str | Path,
    train_images: str | Path,
    val_ann: str | Path,
    val_images: str | Path,
    work_dir: str | Path,
    params: FinetuneParams,
    hooks: PipelineHooks | None = None,
) -> Path:
    """The `self` engine's teacher: these parameters fine-tuned on the labelled images alone,
    selected on the val images, in TEACHER_SHARE of the time budget when there is one.
    Resumable in `work_dir`; returns its model.pt.

    Its stages are reported as one, "teaching", so that a job's stage and progress do not jump
    back and forth between the teacher's fine-tuning and the final one.
    """
    from models.config import MIN_TIME_BUDGET_MIN

    hooks = hooks or PipelineHooks()
    done = Path(work_dir) / "model.pt"
    if done.is_file():
        return done
    budget = max(MIN_TIME_BUDGET_MIN, params.time_budget_min * TEACHER_SHARE) if params.time_budget_min else 0.0
    teacher_params = dataclasses.replace(params, pretrain=False, time_budget_min=budget)
    on_stage = hooks.on_stage

    def teaching(stage: Stage) -> None:
        if on_stage is not None and stage == "validating":
            on_stage("teaching")

    teacher_hooks = dataclasses.replace(hooks, on_stage=teaching, on_init=None, on_evaluation=None)
    return Path(run_finetune(train_ann, train_images, work_dir, teacher_params, val_ann, val_images,
                             hooks=teacher_hooks).artifact)


def teacher_min_score(teacher: Path, val_ann: str | Path, val_images: str | Path,
                      params: FinetuneParams) -> dict[str, Any]:
    """The score the `self` engine's pseudo masks need: params.self_min_score when given, else calibrated on
    the val images the teacher was selected on (self_training.calibrate_min_score), kept beside the teacher
    (``min_score.json``) so that a resumed job cuts where it did. Returns {"min_score", "calibrated", ...}."""
    if params.self_min_score is not None:
        return {"min_score": params.self_min_score, "calibrated": False}
    from models.uplvp.proposals.self_training import calibrate_min_score

    done = teacher.parent / "min_score.json"
    if done.is_file():
        return json.loads(done.read_text())
    cut = calibrate_min_score(teacher, val_ann, val_images, device=params.on_device().device)
    done.write_text(json.dumps(cut))
    return cut


def propose_pool(
    images: str | Path | list[Path],
    vocabulary: list[str],
    work_dir: str | Path,
    params: FinetuneParams,
    hooks: PipelineHooks | None = None,
    teacher: str | Path | None = None,
    budget_min: float | None = None,
) -> tuple[Path, Path]:
    """Masks Proposal on the images of a folder (or several), resumable in `work_dir` (``pseudo.json`` with
    its partial file). Arguments as run_uplvp_pretraining's. Returns (pseudo.json, the pool's folder)."""
    import torch

    from models.engine.train import TrainingCancelled
    from models.uplvp.proposals import build_engine, propose_folder
    from models.uplvp.proposals.self_training import FIXED_MIN_SCORE

    hooks = hooks or PipelineHooks()
    params = params.on_device()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    images = image_pool([Path(f) for f in images] if isinstance(images, list) else [Path(images)], work / "pool")
    pseudo = work / "pseudo.json"
    if not pseudo.is_file():
        _stage(hooks, "proposing")
        if params.threads:
            torch.set_num_threads(params.threads)
        # run_finetune passes the cut it calibrated for its teacher (teacher_min_score)
        min_score = FIXED_MIN_SCORE if params.self_min_score is None else params.self_min_score
        engine = build_engine(params.proposal_engine, vocabulary, model=teacher, min_score=min_score,
                              device=params.device)
        # inside a job's budget the proposals have their share of it; pre-training done once on its
        # own budget (budget_min) proposes on the whole pool
        limit = 60.0 * params.time_budget_min * PROPOSAL_SHARE if budget_min is None else 0.0
        propose_folder(images, engine, pseudo.with_suffix(".tmp.json"), max_masks=params.max_masks,
                       progress=hooks.on_proposal, should_stop=hooks.should_stop, max_seconds=limit,
                       seed=params.seed)
        if hooks.should_stop and hooks.should_stop():
            raise TrainingCancelled("cancelled while proposing pseudo masks")
        pseudo.with_suffix(".tmp.json").replace(pseudo)
    return pseudo, images


def run_uplvp_pretraining(
    images: str | Path | list[Path],
    vocabulary: list[str],
    work_dir: str | Path,
    params: FinetuneParams,
    hooks: PipelineHooks | None = None,
    teacher: str | Path | None = None,
    budget_min: float | None = None,
) -> Path:
    """UPLVP on the images of a folder (or several): Masks Proposal, then prompt-kernel pre-training.

    Both steps are resumable in `work_dir` (``pseudo.json`` with its partial file, and
    ``pretrain.pt``). `teacher` is the `self` engine's trained checkpoint (`train_teacher`).
    `budget_min` is the pre-training's own time budget (default: its share of params' budget).
    Returns the pre-trained checkpoint, for `run_finetune(init=...)`.
    """
    from models.uplvp.prompts import PromptConfig

    hooks = hooks or PipelineHooks()
    params = params.on_device()
    pseudo, images = propose_pool(images, vocabulary, work_dir, params, hooks, teacher, budget_min)
    ckpt = Path(work_dir) / "pretrain.pt"
    _stage(hooks, "pretraining")
    prompt_cfg = PromptConfig(num_slots=params.max_masks)
    # params.kernels: run_finetune passes the count its fine-tuning data needs
    init = Path(teacher) if teacher is not None and params.student_from_teacher else None
    return pretrain_from_pseudo(pseudo, images, ckpt, params.pretrain_config(budget_min), prompt_cfg, params.model_config, hooks,
                                resume=ckpt if ckpt.is_file() else None, extra={"engine": params.proposal_engine},
                                init=init)


def pretrain_from_pseudo(
    pseudo: str | Path,
    images: str | Path,
    out: str | Path,
    tcfg: Any,
    prompt_cfg: Any,
    model_config: Callable[[int], Any],
    hooks: PipelineHooks | None = None,
    resume: str | Path | None = None,
    train_backbone: bool = False,
    extra: dict[str, Any] | None = None,
    on_data: Callable[[dict[str, Any]], None] | None = None,
    init: str | Path | None = None,
) -> Path:
    """Kernel supervision with prompt-kernel matching on a pseudo-mask file; what the worker's
    pre-training and `uplvp pretrain` both run.

    `model_config(num_pseudo_categories) -> ModelConfig` shapes a new model (a resumed one keeps
    its own); `prompt_cfg.num_slots` is capped at the number of kernels. `on_data(summary)` sees
    what `load_pseudo` found before any step is taken (the CLI prints it, and may refuse). `init` is a
    checkpoint a new model starts from (engine.checkpoint.init_from: the tensors whose shapes fit; the
    `self` engine's teacher), not used when resuming.
    Checkpoints go to `out` every epoch; returns `out`.
    """
    import torch

    from models.data.transforms import TransformConfig
    from models.engine.checkpoint import init_from, load_checkpoint
    from models.nets.build import build_model
    from models.uplvp.pretrain import load_pseudo, pretrain

    hooks = hooks or PipelineHooks()
    tcfg = tcfg.validate()
    dataset, summary = load_pseudo(pseudo, images, TransformConfig(tcfg.short_side, tcfg.max_long_side))
    if on_data:
        on_data(summary)
    categories = dataset.ann.categories
    state = load_checkpoint(resume) if resume is not None else None
    mcfg = state["model_config"] if state else model_config(len(categories))
    prompt_cfg = dataclasses.replace(prompt_cfg, num_slots=min(prompt_cfg.num_slots, mcfg.num_kernels))
    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg, tcfg.short_side, tcfg.max_long_side)
    started_from = None
    if init is not None and state is None:
        report = init_from(model, init, categories.to_coco())
        started_from = {"checkpoint": str(init), "loaded": len(report["loaded"]),
                        "not_loaded": len(report["reinitialised"]) + len(report["missing"]),
                        "class_head": report["class_head"]}
    pretrain(model, dataset, mcfg, tcfg, prompt_cfg, categories.to_coco(), out=out, resume=state,
             train_backbone=train_backbone, hooks=hooks.train_hooks(),
             extra={"pseudo": str(pseudo), **(extra or {}), **summary,
                    **({"started_from": started_from} if started_from else {})})
    return Path(out)


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
    from models.engine.checkpoint import export_for_serving, load_checkpoint
    from models.reports.pictures import learning_curve_png
    from models.uplvp.proposals import parse_vocabulary

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


GPU_RESERVE_FRACTION = 0.25  # a GPU infer worker keeps this share of its memory free for activations


class PredictorCache:
    """Loaded models kept in memory, least recently used evicted first.

    Keyed by anything hashable that changes when the model does, e.g. (artifact key, sha256),
    so a replaced checkpoint is reloaded; `locate()` is called only on a miss, which is where
    a store downloads or verifies the file. With `onnx` (a function giving the model's ONNX
    export) the model runs under ONNX Runtime instead (OnnxPredictor: faster on CPU,
    bench/results/inference.md); on a GPU, only where ONNX Runtime has its CUDA provider (else
    PyTorch on the GPU serves: faster than ONNX Runtime on the CPU).

    The cache holds at most `capacity` models, and on a GPU also stops where memory does: before
    a model loads, least recently used ones are dropped until `reserve_fraction` of the GPU's
    memory is free (`free_bytes` tells how much is, default torch.cuda.mem_get_info).
    """

    def __init__(self, capacity: int = 4, num_threads: int = 0, device: str = "cpu",
                 reserve_fraction: float = GPU_RESERVE_FRACTION,
                 free_bytes: Callable[[], int | None] | None = None,
                 total_bytes: Callable[[], int | None] | None = None) -> None:
        from models.engine.device import free_memory_bytes, resolve_device, total_memory_bytes

        self.capacity = max(1, capacity)
        self.num_threads = num_threads
        self.device = resolve_device(device)
        self.reserve_fraction = reserve_fraction
        self._free = free_bytes or (lambda: free_memory_bytes(self.device))
        self._total = total_bytes or (lambda: total_memory_bytes(self.device))
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, locate: Callable[[], str | Path] | None = None,
            onnx: Callable[[], str | Path] | None = None) -> Any:
        """The predictor for `key`, loading `onnx()` under ONNX Runtime, or else `locate()` (default: `key`
        is the checkpoint path) under PyTorch, on a miss."""
        from models.engine.inference import OnnxPredictor, Predictor

        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        self._make_room()
        if onnx is not None and self.onnx_ok:
            predictor: Any = OnnxPredictor(onnx(), num_threads=self.num_threads, device=self.device)
        else:
            predictor = Predictor(locate() if locate is not None else key, num_threads=self.num_threads,
                                  device=self.device)
        self._items[key] = predictor
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return predictor

    @property
    def onnx_ok(self) -> bool:
        """Whether ONNX exports run on this cache's device: always on the CPU, on a GPU only with ONNX
        Runtime's CUDA provider (onnxruntime-gpu); otherwise `get` loads the checkpoint (`locate`)."""
        from models.engine.inference import onnx_providers

        return self.device.type == "cpu" or "CUDAExecutionProvider" in onnx_providers(self.device)

    def _make_room(self) -> None:
        """Drop least recently used models while the GPU has less than its reserve free (a no-op on the CPU)."""
        from models.engine.device import release_memory

        total = self._total()
        if total is None:
            return
        while self._items and (self._free() or 0) < self.reserve_fraction * total:
            self._items.popitem(last=False)
            release_memory(self.device)

    def __contains__(self, key: Any) -> bool:
        return key in self._items

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
    polygons: bool | None = None,
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    """Segment (name, bytes) images with a Predictor (the service and `uplvp segment`).

    fmt "json": per image {"file_name", "width", "height", "instances": [{category_id,
    category_name, score, bbox, area, segmentation (RLE), polygons}]}.
    fmt "png": per image {"file_name", "png_base64"}: the overlay drawn by models.reports.overlays.
    """
    from models.data.coco import decode_image
    from models.reports.overlays import draw_overlay

    if fmt not in ("json", "png"):
        raise ConfigError(f"format must be 'json' or 'png', got {fmt!r}")
    decoded = [decode_image(data, name) for name, data in images]
    with_polygons = fmt == "json" if polygons is None else polygons
    preds = predictor.predict_images(decoded, score_threshold, with_polygons=with_polygons, batch_size=batch_size)
    out: list[dict[str, Any]] = []
    for (name, _), img, instances in zip(images, decoded, preds):
        if fmt == "json":
            out.append({"file_name": name, "width": img.width, "height": img.height, "instances": instances})
        else:
            buf = io.BytesIO()
            draw_overlay(img, instances).save(buf, format="PNG")
            out.append({"file_name": name, "png_base64": base64.b64encode(buf.getvalue()).decode("ascii")})
    return out
