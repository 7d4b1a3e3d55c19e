"""Celery tasks: thin wrappers that run models.pipeline and report through the Redis registry.

`uplvp.finetune(job_id)` is idempotent on the job id: a run lock (Redis key with expiry,
refreshed every training step) makes sure only one run of a job trains at a time; a
redelivered job (its worker died) resumes from the checkpoint in its work dir; a job that is
already finished is left alone. Cancellation is cooperative: the cancel flag in the job record
is read before every training step.

`uplvp.segment(...)` runs on the `infer` queue; loaded models stay in an LRU cache.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

from celery.exceptions import SoftTimeLimitExceeded

from app.core.config import get_settings
from app.registry import TERMINAL, NotFound, Registry, connect
from worker.celery_app import FINETUNE_TASK, SEGMENT_TASK, celery_app

_registry: Registry | None = None
_predictors: Any = None


def registry() -> Registry:
    """The worker's registry client (one per process)."""
    global _registry
    if _registry is None:
        s = get_settings()
        _registry = Registry(connect(s.redis_url), s.data_dir)
    return _registry


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class JobReporter:
    """PipelineHooks backed by the registry: stage, progress, ETA, losses, cancel flag, lock refresh.

    `progress` runs 0..1 over the whole job: each stage owns a slice (see RANGES); steps inside
    a training stage advance it evenly. `eta_s` extrapolates the current training stage's speed.
    """

    RANGES: ClassVar[dict[bool, dict[str, tuple[float, float]]]] = {
        False: {"validating": (0.0, 0.02), "finetuning": (0.02, 0.95), "evaluating": (0.95, 0.98)},
        True: {"validating": (0.0, 0.02), "proposing": (0.02, 0.15), "pretraining": (0.15, 0.45),
               "finetuning": (0.45, 0.95), "evaluating": (0.95, 0.98)},
    }

    def __init__(self, reg: Registry, job_id: str, token: str, epochs: int, lock_ttl_s: int,
                 min_interval_s: float = 0.5, pretrain_epochs: int = 0, pretrained: bool = False) -> None:
        self.reg, self.job_id, self.token, self.ttl = reg, job_id, token, lock_ttl_s
        self.epochs = max(1, epochs)
        self.pretrain_epochs = max(1, pretrain_epochs or epochs)
        self.ranges = self.RANGES[pretrained]
        self.min_interval_s = min_interval_s
        self.lost_lock = False
        self.stage = "validating"
        self._last_write = 0.0
        self._last_refresh = time.monotonic()
        self._t0: float | None = None
        self._done0 = 0

    def _progress(self, frac: float) -> float:
        lo, hi = self.ranges.get(self.stage, (0.0, 0.0))
        return round(lo + (hi - lo) * min(1.0, max(0.0, frac)), 4)

    def on_stage(self, stage: str) -> None:
        """Record the stage (validating, proposing, pretraining, finetuning, evaluating)."""
        self.stage, self._t0 = stage, None
        self.reg.update_job(self.job_id, stage=stage, progress=self._progress(0.0))

    def on_proposal(self, done: int, total: int) -> None:
        """Masks Proposal progress (images done of all)."""
        self.reg.update_job(self.job_id, progress=self._progress(done / max(1, total)))

    def on_step(self, epoch: int, step: int, steps: int, losses: dict[str, float]) -> None:
        """Progress, ETA and the step's losses (written at most every min_interval_s)."""
        epochs = self.pretrain_epochs if self.stage == "pretraining" else self.epochs
        done, total = epoch * steps + step + 1, max(1, epochs * steps)
        now = time.monotonic()
        if self._t0 is None:
            self._t0, self._done0 = now, done - 1
        if now - self._last_write < self.min_interval_s and step + 1 < steps:
            return
        self._last_write = now
        rate = (done - self._done0) / max(1e-6, now - self._t0)
        remaining = total - done + (self.epochs * steps if self.stage == "pretraining" else 0)
        self.reg.update_job(self.job_id, epoch=epoch + 1, step=step + 1, steps_per_epoch=steps, losses=losses,
                            progress=self._progress(done / total),
                            eta_s=round(remaining / rate, 1) if rate > 0 else None)

    def on_epoch(self, entry: dict[str, Any]) -> None:
        """Epoch summary: mean losses of the epoch."""
        self.reg.update_job(self.job_id, epoch=entry["epoch"], losses={"loss": entry["loss"], **entry["losses"]})

    def should_stop(self) -> bool:
        """True when a cancel was requested or this run lost its lock (checked every step)."""
        now = time.monotonic()
        if now - self._last_refresh > self.ttl / 5:
            self._last_refresh = now
            if not self.reg.refresh_lock(self.job_id, self.token, self.ttl):
                self.lost_lock = True
                return True
        return self.reg.cancel_requested(self.job_id)

    def hooks(self) -> Any:
        """These callbacks as a models.pipeline.PipelineHooks."""
        from models.pipeline import PipelineHooks

        return PipelineHooks(on_stage=self.on_stage, on_proposal=self.on_proposal, on_step=self.on_step,
                             on_epoch=self.on_epoch, should_stop=self.should_stop)


def _fail(reg: Registry, job_id: str, code: str, message: str) -> str:
    reg.finish_job(job_id, "failed", error={"code": code, "message": message})
    return "failed"


def _init_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """What initialising from a base / pre-trained checkpoint did (tensors loaded, class head)."""
    if report is None:
        return None
    return {"loaded": len(report["loaded"]), "reinitialised": len(report["reinitialised"]),
            "class_head": report["class_head"]}


def run_finetune_job(job_id: str, reg: Registry, token: str) -> str:
    """Run one job while holding its lock; returns the final state (or 'lost_lock')."""
    from models.errors import UplvpError
    from models.pipeline import FinetuneParams, run_finetune
    from models.train import TrainingCancelled

    s = get_settings()
    status = reg.start_job(job_id)
    if status != "started" and status != "running":
        return status  # missing, cancelled while queued, or already finished
    job = reg.get_job(job_id)
    work = reg.job_dir(job_id)
    ds = job["dataset"]
    root = work / "dataset"
    params = FinetuneParams.from_dict(job["params"])
    if s.worker_threads:
        params.threads = s.worker_threads
    reporter = JobReporter(reg, job_id, token, params.epochs, s.job_lock_ttl_s,
                           pretrain_epochs=params.pretrain_epochs, pretrained=params.pretrain)
    init = reg.data_dir / job["params"]["init_artifact"] if job["params"].get("init_artifact") else None
    try:
        result = run_finetune(root / ds["train_ann"], root / ds["train_images"], work / "run", params,
                              val_ann=root / ds["val_ann"] if ds.get("val_ann") else None,
                              val_images=root / ds["val_images"] if ds.get("val_images") else None,
                              init=init, hooks=reporter.hooks())
    except TrainingCancelled:
        if reporter.lost_lock:
            return "lost_lock"
        reg.finish_job(job_id, "cancelled")
        return "cancelled"
    except UplvpError as exc:
        # Paths relative to the job's folder: the user knows the zip's names, not our disk layout.
        message = str(exc).replace(str(root) + "/", "").replace(str(work / "run" / "split") + "/", "split ")
        return _fail(reg, job_id, "invalid_input", message)
    except SoftTimeLimitExceeded:
        return _fail(reg, job_id, "time_limit", f"the job ran past its time limit ({s.job_time_limit_s} s)")
    reg.update_job(job_id, progress=0.98)
    parent = None
    if job.get("base"):
        bname, _, bver = job["base"].partition(":")
        parent = {"name": bname, "version": int(bver)}
    rec = reg.register_version(job["name"], result.artifact, file_sha256(result.artifact), result.metrics,
                               result.categories, result.params, parent, job["dataset"]["sha256"], job_id)
    reg.finish_job(job_id, "succeeded", result={"model": job["name"], "version": rec["version"],
                                                "metrics": result.metrics,
                                                "num_train_images": result.num_train_images,
                                                "num_val_images": result.num_val_images,
                                                "resumed_from_epoch": result.resumed_from_epoch,
                                                "init": _init_summary(result.init_report)})
    return "succeeded"


@celery_app.task(name=FINETUNE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def finetune(self: Any, job_id: str) -> str:
    """Fine-tune the job `job_id` (its record in the registry holds everything)."""
    s = get_settings()
    reg = registry()
    token = reg.acquire_lock(job_id, s.job_lock_ttl_s)
    if token is None:
        try:
            if reg.get_job(job_id)["state"] in TERMINAL:
                return "already_finished"
        except NotFound:
            return "missing"
        # Another run holds the lock (or a dead run's lock has not expired yet): try again later.
        raise self.retry(countdown=min(60, s.job_lock_ttl_s))
    state = "failed"
    try:
        state = run_finetune_job(job_id, reg, token)
        return state
    except Exception as exc:
        _fail(reg, job_id, "internal_error", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        reg.release_lock(job_id, token)
        if state in TERMINAL or state == "failed":
            shutil.rmtree(reg.job_dir(job_id), ignore_errors=True)


@celery_app.task(name=SEGMENT_TASK, acks_late=False)
def segment(artifact: str, sha256: str, images: list[list[str]], score_threshold: float, fmt: str) -> dict[str, Any]:
    """Segment base64 images with a registered model; returns {"results": [...]} or {"error": {...}}."""
    from models.errors import UplvpError
    from models.pipeline import PredictorCache
    from models.pipeline import segment as run_segment

    global _predictors
    s = get_settings()
    if _predictors is None:
        _predictors = PredictorCache(s.model_cache_size, s.worker_threads)
    path = s.data_dir / artifact
    try:
        predictor = _predictors.get(path, sha256)
        decoded = [(name, base64.b64decode(data)) for name, data in images]
        return {"results": run_segment(predictor, decoded, score_threshold, fmt)}
    except UplvpError as exc:
        return {"error": {"code": "invalid_input", "message": str(exc).replace(str(s.data_dir) + "/", "")}}
