"""Where a model runs: device selection, mixed precision, the batch size a device takes, and
what to do when a GPU runs out of memory.

One place for these decisions, so that the training loop, the predictors, the CLI and the
workers agree:
- `resolve_device("auto" | "cpu" | "cuda" | "cuda:N")`: `auto` takes CUDA when torch sees a GPU,
  else the CPU. Asking for CUDA where there is none is an error, never a silent fall-back.
- `precision_for(device, amp)`: autocast is on by default on CUDA (bf16 where the GPU supports
  it, else fp16 with a gradient scaler) and off on the CPU, where it can still be asked for.
- `default_batch_size(device)`: the CPU default (2) stays; a GPU takes more per step.
- `is_out_of_memory(exc)`: the service fails such a job as `out_of_memory` with a hint.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from typing import Any

import torch

from models.config import DEVICE_PATTERN
from models.errors import ConfigError

CPU_BATCH_SIZE = 2  # the recipe's batch on 2 cores (README, "The recipe")
# A GPU takes a larger batch: 8 images of ~320x533 with 50-100 kernels use ~6 GB in training at bf16
# (activations of the 3 kernel stages dominate); 16 from 40 GB up. Documented in the README.
GPU_BATCH_SIZE = 8
LARGE_GPU_BATCH_SIZE = 16
LARGE_GPU_BYTES = 40 * 1024**3


class DeviceError(ConfigError):
    """The device asked for does not exist here (e.g. UPLVP_DEVICE=cuda on a machine without a GPU)."""

    code = "device_unavailable"


def check_device_spec(spec: str) -> str:
    """`spec` normalised (lower case, stripped), or DeviceError naming the accepted forms."""
    norm = str(spec).strip().lower()
    if not DEVICE_PATTERN.match(norm):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N (N a GPU index), got {spec!r}")
    return norm


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch.device that `spec` names on this machine.

    auto: cuda:0 when torch.cuda.is_available(), else cpu. cuda / cuda:N where CUDA is not
    available, or N is not a visible GPU: DeviceError (a job must not run on the CPU for hours
    when the user asked for a GPU).
    """
    norm = check_device_spec(spec)
    if norm == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if norm == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {norm!r} was asked for, but torch sees no CUDA GPU here "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use cpu or auto, "
                          "or check the driver and CUDA_VISIBLE_DEVICES")
    index = int(norm.split(":")[1]) if ":" in norm else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {norm!r} was asked for, but only {count} GPU(s) are visible "
                          f"(cuda:0..cuda:{count - 1}); check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def device_info(device: torch.device | str) -> dict[str, Any]:
    """What a job record, a version's metadata and a worker's heartbeat say about a device:
    {"device": "cuda:0" | "cpu", "name", and "memory_gb" for a GPU or "threads" for the CPU}."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {"device": f"cuda:{index}", "name": props.name, "memory_gb": round(props.total_memory / 1024**3, 1)}
    return {"device": "cpu", "name": platform.processor() or platform.machine() or "cpu",
            "threads": torch.get_num_threads()}


@dataclass(frozen=True)
class Precision:
    """How a training step runs: autocast on/off, its dtype, and whether gradients are scaled
    (fp16 only: its 5-bit exponent underflows small gradients; bf16 has float32's range)."""

    enabled: bool
    dtype: torch.dtype = torch.float32
    scaled: bool = False

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32") if self.enabled else "fp32"


def precision_for(device: torch.device | str, amp: bool | None = None) -> Precision:
    """Mixed precision for a device: `amp` None is on for CUDA and off for the CPU.

    CUDA: bf16 where the GPU supports it (Ampere and later), else fp16 with a gradient scaler.
    CPU with amp=True: bf16 autocast (oneDNN; no scaler needed).
    """
    device = torch.device(device)
    on = device.type == "cuda" if amp is None else bool(amp)
    if not on:
        return Precision(False)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision(True, torch.float16, scaled=True)
    return Precision(True, torch.bfloat16)


def autocast(device: torch.device | str, precision: Precision) -> contextlib.AbstractContextManager:
    """The autocast context of a step (a no-op context when mixed precision is off)."""
    device = torch.device(device)
    if not precision.enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def grad_scaler(device: torch.device | str, precision: Precision) -> torch.amp.GradScaler:
    """A gradient scaler that is enabled only where the precision needs one (fp16)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision.scaled)


def default_batch_size(device: torch.device | str) -> int:
    """Images per training step when the user gives none: 2 on the CPU, 8 on a GPU (16 from 40 GB)."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    index = device.index if device.index is not None else 0
    total = torch.cuda.get_device_properties(index).total_memory
    return LARGE_GPU_BATCH_SIZE if total >= LARGE_GPU_BYTES else GPU_BATCH_SIZE


def loader_workers(device: torch.device | str, asked: int = -1) -> int:
    """DataLoader worker processes: `asked` when >= 0; else none on the CPU (decoding shares the 2 cores
    with the step anyway) and up to 4 on a GPU, where the step is fast enough to wait on JPEG decoding."""
    if asked >= 0:
        return asked
    if torch.device(device).type != "cuda":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a GPU (or host) allocation failure that a smaller batch or image could avoid."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def release_memory(device: torch.device | str | None = None) -> None:
    """Give cached GPU blocks back after a failed job, so that the next job starts from an empty GPU."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory on a GPU as the driver sees it (None on the CPU, where the OS manages memory)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def total_memory_bytes(device: torch.device | str) -> int | None:
    """A GPU's memory (None on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device.index or 0).total_memory)


def configure_backends(device: torch.device | str) -> None:
    """Per-process settings for a CUDA device: cuDNN autotuning and TF32 matmuls.

    cudnn.benchmark is on: images are padded to multiples of 32 (models.data.dataset), so a run
    meets a few dozen distinct shapes at most (scale jitter x two orientations), each tuned once.
    """
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


__all__ = ["DeviceError", "Precision", "autocast", "check_device_spec", "configure_backends", "default_batch_size",
           "device_info", "free_memory_bytes", "grad_scaler", "is_out_of_memory", "loader_workers", "precision_for", "release_memory",
           "resolve_device", "total_memory_bytes"]
