"""Model and training settings as dataclasses (nanoGPT style).

Everything that shapes a model or a run lives here, so a checkpoint can carry its
own config and be rebuilt exactly. `build_*` factories (knet.build_knet,
maskrcnn.build_maskrcnn, build_model below) are the only place config meets classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
import re
from typing import Any, Literal

from models.errors import ConfigError

Arch = Literal["knet", "maskrcnn"]
MIN_TIME_BUDGET_MIN = 1.0  # the smallest training budget (minutes): a few timed steps and one evaluation
BackboneWeights = Literal["imagenet", "none"]
# where a run trains: auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N (models.engine.device)
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass
class ModelConfig:
    """Architecture of one segmenter. Defaults are the CPU-scale plan of method.md §7."""

    arch: Arch = "knet"
    num_classes: int = 1
    backbone_weights: BackboneWeights = "imagenet"
    width: int = 128  # neck / kernel channels C (reference: 256)
    num_kernels: int = 50  # N dynamic kernels (reference: 100)
    num_stages: int = 3  # S kernel-update stages
    num_heads: int = 4  # kernel self-attention heads (head dim = width / heads)
    ffn_dim: int = 512  # kernel FFN hidden size (4 x width)
    gn_groups: int = 32
    mask_threshold: float = 0.5  # binarisation of predicted masks at inference
    max_per_image: int = 100  # top-k over kernels x classes at inference
    rescore: bool = True  # score = class probability x mask quality (models.engine.predict)
    nms: bool = True  # Matrix NMS among the masks of one class at inference
    frozen_backbone_stages: int = 1  # MobileNetV2 stages (0..5) with frozen weights
    # FPN P2 without its 3x3 output conv (the semantic FPN's stride-2 conv reads P2 anyway): the
    # largest conv of the network at stride 4, ~40 % of the neck's multiply-adds. False keeps the
    # reference layout (and loads checkpoints made before this option).
    light_p2: bool = False
    # Initial kernel features: the initial kernel plus the "sum" (reference) or "mean" of the
    # features under its hard mask. The sum is ~hundreds of times the kernel's own weight, so
    # all N kernels start out pointing the same way; the mean keeps them apart.
    init_pool: str = "sum"
    # std of the initial kernels' weights (the reference: 1.0, whose mask logits start saturated
    # at ~sqrt(width) and move ~lr per Adam step; 0: 1/sqrt(width), logits of unit scale)
    init_kernel_std: float = 1.0
    one_to_many: int = 1  # k > 1: one-to-many matching (k kernels per object) before the last stage (criterion.py)
    # Where the initial kernels come from: "static" (reference K-Net: N learnt vectors, the same for
    # every image) or "centers": a dense head predicts object centres, and each image's N kernels
    # are its N highest centre peaks' features (plus the learnt vectors), so every kernel starts on
    # one object of this image (the query selection of DINO / Mask DINO); its loss is "center".
    kernel_init: str = "static"
    # Grid of the last stage's masks (the answer): 8 (reference: the stride-8 features, upsampled
    # x2 for the loss and the output) or 4: the last stage dots its kernels with stride-4
    # features (FPN P2 through a 1x1 conv, plus the stride-8 features upsampled), as Mask2Former
    # and SOLOv2 do. Earlier stages stay at stride 8: they only steer the kernels.
    mask_stride: int = 8
    # The neck's 3x3 convs (FPN outputs, semantic FPN, centre head): "full" (reference) or
    # "separable" (depthwise 3x3 + pointwise 1x1). At width 128 and 320 px the full ones are 2/3
    # of the forward multiply-adds, more than the backbone, and all of them are trained.
    neck_conv: str = "full"
    # Class evidence from ImageNet: each stage adds to its class logits a linear read-out of the
    # backbone's 1280-channel classifier features averaged under the kernel's mask. The kernels'
    # own class head learns from the few labels alone, on a neck trained from scratch.
    class_from_backbone: bool = False

    def validate(self) -> "ModelConfig":
        if self.arch not in ("knet", "maskrcnn"):
            raise ConfigError(f"arch must be 'knet' or 'maskrcnn', got {self.arch!r}")
        if self.backbone_weights not in ("imagenet", "none"):
            raise ConfigError(f"backbone_weights must be 'imagenet' or 'none', got {self.backbone_weights!r}")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.width % self.num_heads or self.width % self.gn_groups:
            raise ConfigError(
                f"width ({self.width}) must be divisible by num_heads ({self.num_heads}) and gn_groups ({self.gn_groups})"
            )
        if self.width % 4:
            raise ConfigError(f"width must be a multiple of 4 (sine positional encoding), got {self.width}")
        if self.num_kernels < 1 or self.num_stages < 1:
            raise ConfigError("num_kernels and num_stages must be >= 1")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ConfigError(f"mask_threshold must be in (0, 1), got {self.mask_threshold}")
        if self.kernel_init not in ("static", "centers"):
            raise ConfigError(f"kernel_init must be 'static' or 'centers', got {self.kernel_init!r}")
        if self.neck_conv not in ("full", "separable"):
            raise ConfigError(f"neck_conv must be 'full' or 'separable', got {self.neck_conv!r}")
        if self.mask_stride not in (4, 8):
            raise ConfigError(f"mask_stride must be 4 or 8, got {self.mask_stride}")
        if self.init_pool not in ("sum", "mean"):
            raise ConfigError(f"init_pool must be 'sum' or 'mean', got {self.init_pool!r}")
        if not 0 <= self.frozen_backbone_stages <= 5:
            raise ConfigError(f"frozen_backbone_stages must be in 0..5, got {self.frozen_backbone_stages}")
        return self


@dataclass
class TrainConfig:
    """One fine-tuning (or pre-training) run. Schedules are in epochs, not iterations."""

    epochs: int = 12
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.25
    warmup_iters: int = 100
    warmup_ratio: float = 0.001
    lr_steps: tuple[float, ...] = (2 / 3, 11 / 12)  # fractions of `epochs` where lr *= 0.1
    grad_clip: float = 4.0
    seed: int = 0
    short_side: int = 384
    max_long_side: int = 640
    flip_prob: float = 0.5
    num_threads: int = 0  # 0: leave torch's default
    eval_every: int = 1  # epochs between evaluations when a val set is given
    checkpoint_every: int = 1
    # Time budget: > 0 lays the run out for this many seconds of training (evaluations
    # included) from the step time measured in the first steps; `epochs` is then only a cap.
    time_budget_s: float = 0.0
    max_steps: int = 0  # > 0: the run is this many steps and lr_steps are fractions of them (set by the plan)
    evaluations: int = 8  # budgeted runs: evaluations spread over the run (the last step is always one)
    early_stop_patience: int = 0  # stop after this many evaluations without a better val AP (0: never)
    keep_best: bool = True  # with a val set: the model returned is the evaluation with the best val AP
    # EMA of the weights (0: off): evaluations, the kept checkpoint and the result use the average, whose
    # decay ramps up as min(ema, (1 + t) / (10 + t)) after t updates (train.ema_average)
    ema: float = 0.0
    device: str = "cpu"  # auto | cpu | cuda | cuda:N (models.engine.device.resolve_device)
    amp: bool | None = None  # mixed precision; None: on for CUDA (bf16, else fp16 + grad scaler), off on the CPU
    loader_workers: int = -1  # DataLoader worker processes; -1: none on the CPU, a few on a GPU (device.loader_workers)

    def validate(self) -> "TrainConfig":
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.short_side < 32 or self.max_long_side < self.short_side:
            raise ConfigError(
                f"image size: need 32 <= short_side <= max_long_side, got {self.short_side}, {self.max_long_side}"
            )
        if self.time_budget_s < 0 or self.max_steps < 0 or self.early_stop_patience < 0 or self.evaluations < 1:
            raise ConfigError("time_budget_s, max_steps and early_stop_patience must be >= 0, evaluations >= 1")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema is a decay in [0, 1) (0: off), got {self.ema}")
        if not DEVICE_PATTERN.match(str(self.device)):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if any(not 0 < s <= 1 for s in self.lr_steps):
            raise ConfigError(f"lr_steps are fractions of the run in (0, 1], got {self.lr_steps}")
        return self


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from a dict, ignoring unknown keys (older/newer checkpoints)."""
    known = {f.name for f in fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in known}
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


__all__ = ["ModelConfig", "TrainConfig", "config_from_dict", "config_to_dict", "field"]
