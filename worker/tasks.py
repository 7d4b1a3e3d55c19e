"""Celery tasks: thin wrappers that run models.pipeline and report through the Redis registry.

`uplvp.finetune(job_id)` and `uplvp.pretrain(job_id)` are idempotent on the job id: a run lock
(Redis key with expiry, refreshed every training step) makes sure only one run of a job trains
at a time; a redelivered job (its worker died) resumes from the checkpoint in its work dir; a
job that is already finished is left alone. Cancellation is cooperative: the cancel flag in the
job record is read before every training step.

`uplvp.segment(...)` runs on the `infer` queue and answers POST /segment; `uplvp.segment_job`
is its async form (POST /segment with async=true). Loaded models stay in an LRU cache.
`uplvp.export(...)` (also on `infer`) writes a version's ONNX export into the artifact store once,
for GET /models/{name}/versions/{v}/download?format=onnx. `uplvp.warm(...)` (on `infer`) loads a version
and runs it once, so that the first request is as fast as the tenth: every production version when an
infer worker starts, a version when it is promoted or freshly trained.
"""

from __future__ import annotations

import base64
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from celery.exceptions import SoftTimeLimitExceeded

from app.core.config import get_settings
from app.metrics import record_segment_latency
from app.registry import TERMINAL, NotFound, Registry, from_settings
from app.storage import ArtifactError, StoreUnavailable
from worker.celery_app import (
    EXPORT_TASK,
    WARM_TASK,
    FINETUNE_TASK,
    PRETRAIN_TASK,
    SEGMENT_JOB_TASK,
    SEGMENT_TASK,
    celery_app,
    send_warm,
)

log = logging.getLogger("uplvp.worker")
_registry: Registry | None = None
_device: str | None = None  # worker_device(), resolved once per process
_predictors: Any = None
_exports_asked: set[tuple[str, int]] = set()  # versions this process asked an export for (_predictor)


def registry() -> Registry:
    """The worker's registry client (one per process)."""
    global _registry
    if _registry is None:
        _registry = from_settings(get_settings())
    return _registry


def worker_device() -> str:
    """This worker's device from UPLVP_DEVICE, resolved once: "cpu" or "cuda:N" (DeviceError when it names a
    GPU that is not here; the worker then refuses to start, worker.celery_app)."""
    global _device
    if _device is None:
        from models.engine.device import resolve_device

        device = resolve_device(get_settings().device)
        _device = f"cuda:{device.index}" if device.type == "cuda" else "cpu"
    return _device


def worker_device_info() -> dict[str, Any]:
    """What the heartbeat (GET /readyz) and each job record say about this worker's device."""
    from models.engine.device import device_info

    return device_info(worker_device())


OOM_HINT = ("the {device} ran out of memory: try a smaller batch_size or image_size (or fewer kernels), or a "
            "device with more memory")


class LockKeeper:
    """Keeps a job's run lock alive from a thread (every ttl/5) while the job runs, whatever the
    job is doing (a long evaluation makes no training steps). `lost` is set when someone else
    holds the lock: this run must stop. A dead worker stops refreshing, so its lock expires and
    the reaper (worker.celery_app) re-queues the job."""

    def __init__(self, reg: Registry, job_id: str, token: str, ttl_s: int) -> None:
        self.reg, self.job_id, self.token, self.ttl = reg, job_id, token, ttl_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lock-{job_id[:8]}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 5):
            try:
                if not self.reg.refresh_lock(self.job_id, self.token, self.ttl):
                    self.lost.set()
                    return
            except Exception as exc:  # noqa: BLE001 - Redis away longer than the client's retries: try again
                log.warning("could not refresh the lock of job %s (%s)", self.job_id, exc)

    def __enter__(self) -> LockKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class JobReporter:
    """PipelineHooks backed by the registry: stage, progress, ETA, losses, cancel flag, lock refresh.

    `progress` runs 0..1 over the whole job: each stage owns a slice (see RANGES); steps inside
    a training stage advance it evenly. The training loop announces each stage's layout
    (`on_plan`): its epochs and steps, and for a budgeted fine-tune its time budget, which then
    drives progress and the ETA (the budget is when it ends). Otherwise `eta_s` extrapolates the
    current training stage's speed.
    """

    RANGES: ClassVar[dict[str, dict[str, tuple[float, float]]]] = {
        "finetune": {"validating": (0.0, 0.02), "finetuning": (0.02, 0.95), "evaluating": (0.95, 0.98)},
        "uplvp": {"validating": (0.0, 0.02), "proposing": (0.02, 0.15), "pretraining": (0.15, 0.45),
                  "finetuning": (0.45, 0.95), "evaluating": (0.95, 0.98)},
        # proposal_engine "self": a teacher is fine-tuned first (models.pipeline.train_teacher)
        "uplvp_self": {"validating": (0.0, 0.02), "teaching": (0.02, 0.3), "proposing": (0.3, 0.38),
                       "pretraining": (0.38, 0.55), "finetuning": (0.55, 0.95), "evaluating": (0.95, 0.98)},
        "pretrain": {"validating": (0.0, 0.02), "proposing": (0.02, 0.3), "pretraining": (0.3, 0.98)},
    }

    def __init__(self, reg: Registry, job_id: str, epochs: int, lock_lost: Callable[[], bool] = lambda: False,
                 min_interval_s: float = 0.5, pretrain_epochs: int = 0, plan: str = "finetune",
                 time_budget_s: float = 0.0, checkpoint_upload_s: float = 60.0) -> None:
        self.reg, self.job_id, self.lock_lost = reg, job_id, lock_lost
        self.epochs = max(1, epochs)
        self.pretrain_epochs = max(1, pretrain_epochs or epochs)
        self.ranges = self.RANGES[plan]
        self.finetunes_after = plan.startswith("uplvp")  # the ETA of pre-training includes the fine-tuning after it
        self.min_interval_s = min_interval_s
        self.stage = "validating"
        self.time_budget_s = time_budget_s  # of the fine-tuning stage
        self.total_steps = 0  # of the current training stage, once announced
        self._last_write = 0.0
        self._t0: float | None = None
        self._stage_t0 = time.monotonic()
        self._done0 = 0
        self.checkpoint_upload_s = checkpoint_upload_s
        self._uploaded_at: dict[str, float] = {}  # store name -> when it was last uploaded
        self._pending: set[str] = set()  # resume files written since their last upload (throttled)

    def _progress(self, frac: float) -> float:
        lo, hi = self.ranges.get(self.stage, (0.0, 0.0))
        return round(lo + (hi - lo) * min(1.0, max(0.0, frac)), 4)

    def on_stage(self, stage: str) -> None:
        """Record the stage (validating, proposing, pretraining, finetuning, evaluating)."""
        self.stage, self._t0, self.total_steps, self._stage_t0 = stage, None, 0, time.monotonic()
        self.reg.update_job(self.job_id, stage=stage, progress=self._progress(0.0))
        self._store_finished_files()

    def on_plan(self, plan: dict[str, Any]) -> None:
        """A training stage's layout: its epochs (shown as `epochs` on the job) and steps."""
        if self.stage == "pretraining":
            self.pretrain_epochs = plan["epochs"]
        else:
            self.epochs = plan["epochs"]
            self.time_budget_s = plan.get("time_budget_s") or self.time_budget_s
        self.total_steps = plan["steps"] or plan["epochs"] * plan["steps_per_epoch"]
        self.reg.update_job(self.job_id, epochs=plan["epochs"])

    def on_proposal(self, done: int, total: int) -> None:
        """Masks Proposal progress (images done of all)."""
        self.reg.update_job(self.job_id, progress=self._progress(done / max(1, total)))

    def on_step(self, epoch: int, step: int, steps: int, losses: dict[str, float]) -> None:
        """Progress, ETA and the step's losses (written at most every min_interval_s)."""
        epochs = self.pretrain_epochs if self.stage == "pretraining" else self.epochs
        done = epoch * steps + step + 1
        total = max(1, self.total_steps or epochs * steps)
        now = time.monotonic()
        if self._t0 is None:
            self._t0, self._done0 = now, done - 1
        if now - self._last_write < self.min_interval_s and step + 1 < steps:
            return
        self._last_write = now
        budgeted = self.stage == "finetuning" and self.time_budget_s > 0
        if budgeted:  # a budgeted run ends when its budget does, whatever its steps say
            elapsed = now - self._stage_t0
            frac = max(done / total, elapsed / self.time_budget_s)
            eta: float | None = max(0.0, self.time_budget_s - elapsed)
        else:
            frac = done / total
            rate = (done - self._done0) / max(1e-6, now - self._t0)
            after = self.epochs * steps if self.stage == "pretraining" and self.finetunes_after else 0
            eta = (total - done + after) / rate if rate > 0 else None
            if self.stage == "pretraining" and self.finetunes_after and self.time_budget_s and rate > 0:
                eta = (total - done) / rate + self.time_budget_s
        self.reg.update_job(self.job_id, epoch=epoch + 1, step=step + 1, steps_per_epoch=steps, losses=losses,
                            progress=self._progress(frac), eta_s=round(eta, 1) if eta is not None else None)

    def on_epoch(self, entry: dict[str, Any]) -> None:
        """Epoch summary: mean losses of the epoch, also appended to the job's learning curve."""
        self.reg.update_job(self.job_id, epoch=entry["epoch"], losses={"loss": entry["loss"], **entry["losses"]})
        self.reg.append_history(self.job_id, {"stage": self.stage, "epoch": entry["epoch"], "loss": entry["loss"],
                                              "images_per_s": entry.get("images_per_s"), "AP": entry.get("AP"),
                                              "AP50": entry.get("AP50")})

    def on_checkpoint(self, path: Path) -> None:
        """With a remote store: a resume file (Registry.JOB_RESUME_FILES: the fine-tuning's checkpoint, the
        teacher's, the pre-training's) goes there, each at most every checkpoint_upload_s, so that a worker
        on another host resumes the job from it. One skipped by the throttle goes at the next stage change."""
        if not self.reg.remote_store:
            return
        name = self._store_name(Path(path))
        if name is None:
            return
        now = time.monotonic()
        if name in self._uploaded_at and now - self._uploaded_at[name] < self.checkpoint_upload_s:
            self._pending.add(name)
            return
        self._upload(name)

    def _store_name(self, path: Path) -> str | None:
        """The store name of a file of this job's work dir that lets a job resume, else None."""
        try:
            rel = path.resolve().relative_to(self.reg.job_dir(self.job_id).resolve()).as_posix()
        except ValueError:
            return None
        return next((n for n, r in Registry.JOB_RESUME_FILES.items() if r == rel), None)

    def _upload(self, name: str) -> None:
        local = self.reg.job_dir(self.job_id) / Registry.JOB_RESUME_FILES[name]
        try:
            self.reg.put_job_file(self.job_id, local, name)
            self._uploaded_at[name] = time.monotonic()
            self._pending.discard(name)
        except OSError as exc:  # the store is away: training goes on, and the next checkpoint tries again
            self._pending.add(name)
            log.warning("job %s: %s not stored (%s); trying again at the next one", self.job_id, name, exc)

    def _store_finished_files(self) -> None:
        """At a stage change: the throttled resume files, and the outputs of the stages done (the teacher's
        model, the pseudo masks), which are written once and are not checkpoints."""
        if not self.reg.remote_store:
            return
        work = self.reg.job_dir(self.job_id)
        for name in ("teacher.pt", "pseudo.json"):
            if name not in self._uploaded_at and (work / Registry.JOB_RESUME_FILES[name]).is_file():
                self._pending.add(name)
        for name in sorted(self._pending):
            if (work / Registry.JOB_RESUME_FILES[name]).is_file():
                self._upload(name)

    @property
    def lost_lock(self) -> bool:
        """Another run holds this job's lock now."""
        return self.lock_lost()

    def should_stop(self) -> bool:
        """True when a cancel was requested or this run lost its lock (checked every step)."""
        return self.lost_lock or self.reg.cancel_requested(self.job_id)

    def hooks(self) -> Any:
        """These callbacks as a models.pipeline.PipelineHooks."""
        from models.pipeline import PipelineHooks

        return PipelineHooks(on_stage=self.on_stage, on_proposal=self.on_proposal, on_step=self.on_step,
                             on_epoch=self.on_epoch, on_plan=self.on_plan, should_stop=self.should_stop,
                             on_checkpoint=self.on_checkpoint)


def job_files(reg: Registry, job: dict[str, Any]) -> None:
    """Rebuild a job's work dir on this host from a remote store where it is missing (the job was submitted
    through another host's API, or its first worker died): its uploaded zips, extracted as the API extracted
    them, and the job's resume files (Registry.JOB_RESUME_FILES). A no-op with the local store (the data dir is shared)."""
    from app.dataset import ZipLimits, safe_extract

    if not reg.remote_store:
        return
    s, work = get_settings(), reg.job_dir(job["id"])
    limits = ZipLimits(s.max_zip_members, int(s.max_unzipped_mb * 2**20), s.max_compression_ratio)
    for field, up in ((job.get("dataset") or {}).get("uploads") or {}).items():
        if up is None or (work / up["dir"]).is_dir():
            continue
        try:
            zip_path = reg.store.fetch(up["key"], up["sha256"])  # verified against the sha256 the API recorded
        except ArtifactError as exc:  # the job fails as storage_error, saying which upload
            raise StoreUnavailable(f"the job's upload '{field}' cannot be read from the store: {exc}") from None
        safe_extract(zip_path, work / up["dir"], limits, field=field)
        zip_path.unlink(missing_ok=True)  # the extracted folder is the cache; the zip stays in the store
    for name, rel in Registry.JOB_RESUME_FILES.items():
        local, key = work / rel, reg.job_key(job["id"], name)
        if not local.is_file() and reg.store.exists(key):
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(local.name + ".fetch")  # a file half copied must not look like a finished stage
            shutil.copyfile(reg.store.fetch(key), tmp)
            tmp.replace(local)
            log.info("job %s: resuming with %s from the store", job["id"], name)


def _fail(reg: Registry, job_id: str, code: str, message: str) -> str:
    reg.finish_job(job_id, "failed", error={"code": code, "message": message})
    return "failed"


def _init_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """What initialising from a base / pre-trained checkpoint did (tensors loaded, class head)."""
    if report is None:
        return None
    return {"loaded": len(report["loaded"]), "reinitialised": len(report["reinitialised"]),
            "class_head": report["class_head"]}


def _finetune_body(job: dict[str, Any], reg: Registry, params: Any, reporter: JobReporter) -> dict[str, Any]:
    """Fine-tune (after UPLVP pre-training when asked); returns register_version's arguments + job result."""
    from models.pipeline import run_finetune

    work = reg.job_dir(job["id"])
    root, ds = work / "dataset", job["dataset"]
    init = reg.fetch_artifact(reg.get_version(*_base_ref(job["base"]))) if job.get("base") else None
    result = run_finetune(root / ds["train_ann"], root / ds["train_images"], work / "run", params,
                          val_ann=root / ds["val_ann"] if ds.get("val_ann") else None,
                          val_images=root / ds["val_images"] if ds.get("val_images") else None,
                          init=init, hooks=reporter.hooks(),
                          unlabeled=work / ds["unlabeled_dir"] if ds.get("unlabeled_dir") else None,
                          test_ann=root / ds["test_ann"] if ds.get("test_ann") else None,
                          test_images=root / ds["test_images"] if ds.get("test_images") else None)
    parent = None
    if job.get("base"):
        bname, bver = _base_ref(job["base"])
        parent = {"name": bname, "version": bver}
    return {"artifact": result.artifact, "metrics": result.metrics, "categories": result.categories,
            "params": result.params, "parent": parent, "kind": "finetuned", "reports": result.reports,
            "result": {"num_train_images": result.num_train_images, "num_val_images": result.num_val_images,
                       "resumed_from_epoch": result.resumed_from_epoch, "init": _init_summary(result.init_report)}}


def _pretrain_body(job: dict[str, Any], reg: Registry, params: Any, reporter: JobReporter) -> dict[str, Any]:
    """UPLVP pre-training on the uploaded images; the checkpoint becomes a `pretrained` model version."""
    from models.pipeline import run_pretrain

    work = reg.job_dir(job["id"])
    result = run_pretrain(work / job["dataset"]["images_dir"], job["params"]["vocabulary"], work / "run", params,
                          hooks=reporter.hooks())
    return {"artifact": result.artifact, "metrics": result.metrics, "categories": result.categories,
            "params": result.params, "parent": None, "kind": "pretrained", "reports": result.reports,
            "result": {"num_train_images": result.num_images, "num_val_images": 0}}


def _base_ref(base: str) -> tuple[str, int]:
    name, _, version = base.rpartition(":")
    return name, int(version)


def run_training_job(job_id: str, reg: Registry, lock_lost: Callable[[], bool],
                     body: Callable[[dict[str, Any], Registry, Any, JobReporter], dict[str, Any]],
                     worker: str | None = None) -> str:
    """Run one training job while holding its lock; returns the final state (or 'lost_lock').
    `worker` is the Celery worker's name, recorded in the job's `device` (which host ran it)."""
    from models.engine.train import TrainingCancelled
    from models.errors import UplvpError
    from models.pipeline import FinetuneParams

    s = get_settings()
    status = reg.start_job(job_id)
    if status != "started" and status != "running":
        return status  # missing, cancelled while queued, or already finished
    job = reg.get_job(job_id)
    work = reg.job_dir(job_id)
    params = FinetuneParams.from_dict(job["params"])
    if s.worker_threads:
        params.threads = s.worker_threads
    params.device = worker_device()  # the worker's, not the submitter's: a job runs where a worker takes it
    reg.update_job(job_id, device={**worker_device_info(), **({"worker": worker} if worker else {})})
    plan = "pretrain" if job["kind"] == "pretrain" else "finetune" if not params.pretrain \
        else "uplvp_self" if params.proposal_engine == "self" else "uplvp"
    reporter = JobReporter(reg, job_id, params.epochs, lock_lost, pretrain_epochs=params.pretrain_epochs, plan=plan,
                           time_budget_s=60.0 * params.time_budget_min, checkpoint_upload_s=s.checkpoint_upload_s)
    try:
        job_files(reg, job)
        out = body(job, reg, params, reporter)
    except TrainingCancelled:
        if reporter.lost_lock:
            return "lost_lock"
        reg.finish_job(job_id, "cancelled")
        return "cancelled"
    except UplvpError as exc:
        # Paths relative to the job's folder: the user knows the zip's names, not our disk layout.
        message = str(exc).replace(str(work / "dataset") + "/", "").replace(str(work / "run" / "split") + "/", "split ")
        return _fail(reg, job_id, exc.code, message.replace(str(work) + "/", ""))
    except ArtifactError as exc:
        return _fail(reg, job_id, "base_unavailable", f"the base model version cannot be used: {exc}")
    except StoreUnavailable as exc:  # the S3 store: down past its retries, or its upload gone
        return _fail(reg, job_id, "storage_error", str(exc))
    except OSError as exc:  # disk full or data dir unwritable while writing a checkpoint or report
        return _fail(reg, job_id, "storage_error", f"could not write to the data dir: {exc.strerror or exc}")
    except SoftTimeLimitExceeded:
        return _fail(reg, job_id, "time_limit", f"the job ran past its time limit ({s.job_time_limit_s} s)")
    except Exception as exc:
        from models.engine.device import is_out_of_memory, release_memory

        if not is_out_of_memory(exc):
            raise
        # the job fails, the worker lives on: the next job starts from an emptied GPU
        log.warning("job %s ran out of memory: %s", job_id, exc)
        release_memory(params.device)
        gpu = params.device.startswith("cuda")
        return _fail(reg, job_id, "out_of_memory",
                     OOM_HINT.format(device="GPU" if gpu else "machine") + f" (batch_size {params.batch_size or 'auto'}, "
                     f"image_size {params.image_size or 'auto'})")
    reg.update_job(job_id, progress=0.98)
    try:
        rec = reg.register_version(job["name"], out["artifact"], out["metrics"], out["categories"], out["params"],
                                   out["parent"], job["dataset"]["sha256"], job_id, kind=out["kind"],
                                   reports=out["reports"])
    except OSError as exc:  # disk full, data dir unwritable, S3 down: earlier versions are untouched (atomic put)
        return _fail(reg, job_id, "storage_error", f"could not store the model: {exc.strerror or exc}")
    if s.infer_backend == "onnx" and out["kind"] == "finetuned":
        reg.update_job(job_id, stage="exporting")  # so that the first POST /segment finds the graph ready
        _export_quietly(reg, job["name"], rec["version"])
    if out["kind"] == "finetuned":
        send_warm(celery_app, job["name"], rec["version"])
    reg.finish_job(job_id, "succeeded", result={"model": job["name"], "version": rec["version"],
                                                "metrics": out["metrics"], **out["result"]})
    return "succeeded"


def _training_task(task: Any, job_id: str, body: Callable[..., dict[str, Any]]) -> str:
    """Lock, run, release, clean up: shared by the finetune and pretrain tasks."""
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
        raise task.retry(countdown=min(60, s.job_lock_ttl_s))
    try:
        with LockKeeper(reg, job_id, token, s.job_lock_ttl_s) as keeper:
            return run_training_job(job_id, reg, keeper.lost.is_set, body, worker=task.request.hostname)
    except Exception as exc:
        try:
            _fail(reg, job_id, "internal_error", f"{type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - Redis unreachable: the lock expires and the reaper re-queues the job
            log.exception("could not record the failure of job %s", job_id)
        raise
    finally:
        try:
            reg.release_lock(job_id, token)
            # The work dir (dataset, checkpoints) goes only when the registry says the job is over:
            # a run that died of a Redis outage is resumed from it.
            job = reg.get_job(job_id)
            if job["state"] in TERMINAL:
                shutil.rmtree(reg.job_dir(job_id), ignore_errors=True)  # its files in a remote store went
                # with the transition (Registry._finished)
        except Exception:  # noqa: BLE001
            log.exception("could not release job %s", job_id)


@celery_app.task(name=FINETUNE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def finetune(self: Any, job_id: str) -> str:
    """Fine-tune the job `job_id` (its record in the registry holds everything)."""
    return _training_task(self, job_id, _finetune_body)


@celery_app.task(name=PRETRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def pretrain(self: Any, job_id: str) -> str:
    """UPLVP pre-training job `job_id`: pseudo masks, pre-training, a `pretrained` model version."""
    return _training_task(self, job_id, _pretrain_body)


def _segment(artifact: str, sha256: str, images: list[list[str]], score_threshold: float, fmt: str,
             name: str | None = None, version: int | None = None) -> dict[str, Any]:
    """{"results": [...]} or {"error": {code, message}}; the model is loaded (and its sha256 checked) on a miss,
    as its ONNX export when the backend is onnx and the version is known (UPLVP_INFER_BACKEND)."""
    from models.engine.inference import OnnxPredictor
    from models.errors import UplvpError
    from models.pipeline import segment as run_segment

    s = get_settings()
    t0 = time.perf_counter()
    try:
        predictor = _predictor(artifact, sha256, name, version)
        decoded = [(n, base64.b64decode(data)) for n, data in images]
        backend = "onnx" if isinstance(predictor, OnnxPredictor) else "torch"
        results = run_segment(predictor, decoded, score_threshold, fmt)
        # the worker's own time, so that the API can tell it from the queue's (Server-Timing)
        return {"results": results, "backend": backend, "worker_ms": round(1000 * (time.perf_counter() - t0), 2)}
    except ArtifactError as exc:
        return {"error": {"code": "artifact_unavailable", "message": str(exc)}}
    except UplvpError as exc:
        return {"error": {"code": "invalid_input", "message": str(exc).replace(str(s.data_dir) + "/", "")}}
    except Exception as exc:
        from models.engine.device import is_out_of_memory, release_memory

        if not is_out_of_memory(exc):
            raise
        log.warning("segment ran out of memory: %s", exc)
        release_memory(worker_device())
        return {"error": {"code": "out_of_memory", "message": OOM_HINT.format(device="GPU") if
                          worker_device().startswith("cuda") else "out of memory: send fewer or smaller images"}}
    finally:
        try:
            record_segment_latency(registry(), time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - a metric never fails a request
            log.warning("segment latency not recorded: %s", exc)


def _predictor(artifact: str, sha256: str, name: str | None, version: int | None) -> Any:
    """The loaded model for a version: its stored ONNX export under ONNX Runtime (backend onnx), else the
    checkpoint under PyTorch. A version without an export yet (trained before exports, or by a worker with
    the torch backend) is served by PyTorch at once while an export is asked for, once per process."""
    global _predictors
    reg, s = registry(), get_settings()
    if _predictors is None:
        from models.pipeline import PredictorCache

        _predictors = PredictorCache(s.model_cache_size, s.worker_threads, device=worker_device())
    # ONNX on the CPU; on a GPU only with ONNX Runtime's CUDA provider, else PyTorch on the GPU (PredictorCache)
    if s.infer_backend == "onnx" and name is not None and version is not None and _predictors.onnx_ok:
        key = _cache_key(artifact, sha256, "onnx")
        if key in _predictors:
            return _predictors.get(key)
        stored = reg.fetch_export(reg.get_version(name, version), "onnx")  # None: missing or torn
        if stored is not None:
            try:
                return _predictors.get(key, onnx=lambda: stored[1])
            except Exception as exc:  # noqa: BLE001 - an ONNX Runtime error: PyTorch serves it
                log.warning("the ONNX export of %s v%s does not load: %s", name, version, exc)
        if (name, version) not in _exports_asked:
            _exports_asked.add((name, version))
            _ask_export(name, version)
    return _predictors.get(_cache_key(artifact, sha256, "torch"), lambda: reg.store.fetch(artifact, sha256))


def _cache_key(artifact: str, sha256: str, backend: str) -> tuple[str, str, str]:
    """The model cache's key of a version on a backend: a replaced checkpoint (new sha256) loads again."""
    return artifact, sha256, backend


def _loaded(rec: dict[str, Any]) -> bool:
    """Whether this process holds the version loaded on the backend a request would get now."""
    backend = "onnx" if get_settings().infer_backend == "onnx" and _predictors is not None and _predictors.onnx_ok \
        else "torch"
    return _predictors is not None and _cache_key(rec["artifact"], rec["sha256"], backend) in _predictors


def _ask_export(name: str, version: int) -> None:
    """Queue the version's ONNX export (the export task) without waiting for it."""
    celery_app.send_task(EXPORT_TASK, args=[name, version, "onnx"], queue="infer")


def _export_quietly(reg: Registry, name: str, version: int) -> None:
    """stored_export, where a model that does not export (Mask R-CNN) or a failed export only means that
    the version is served by PyTorch: never a reason to fail the job or the request that asked."""
    from models.errors import UplvpError

    try:
        stored_export(reg, name, version)
    except UplvpError:
        pass
    except Exception as exc:  # noqa: BLE001 - the PyTorch path still serves the version
        log.warning("ONNX export of %s v%s failed, serving it with PyTorch: %s", name, version, exc)


def stored_export(reg: Registry, name: str, version: int, fmt: str = "onnx") -> tuple[dict[str, Any], Path]:
    """A version's export in `fmt`: the stored one when it still matches its sha256, else made now from the
    (sha256-checked) checkpoint and recorded beside it. Returns ({key, sha256, size_bytes}, its local file);
    ExportError for a model that does not export."""
    from models.engine.export import export_onnx

    rec = reg.get_version(name, version)
    stored = reg.fetch_export(rec, fmt)
    if stored is not None:
        return stored
    with tempfile.TemporaryDirectory(dir=get_settings().data_dir) as tmp:
        out = Path(tmp) / f"model.{fmt}"
        export_onnx(reg.fetch_artifact(rec), out)
        entry = reg.record_export(name, version, fmt, out)
    return entry, reg.store.fetch(entry["key"], entry["sha256"])


def loaded_models() -> int:
    """Models this worker process holds (its heartbeat reports it: uplvp_models_loaded)."""
    return len(_predictors) if _predictors is not None else 0


@celery_app.task(name=SEGMENT_TASK, acks_late=False)
def segment(artifact: str, sha256: str, images: list[list[str]], score_threshold: float, fmt: str,
            name: str | None = None, version: int | None = None) -> dict[str, Any]:
    """Segment base64 images with a registered model (POST /segment answers with the return value)."""
    return _segment(artifact, sha256, images, score_threshold, fmt, name, version)


@celery_app.task(name=SEGMENT_JOB_TASK, acks_late=False)
def segment_job(job_id: str, artifact: str, sha256: str, images: list[list[str]], score_threshold: float,
                fmt: str, name: str | None = None, version: int | None = None) -> str:
    """POST /segment with async=true: the same work, the instances stored in the job record. It holds the
    job's run lock while it runs (taken before the job shows as running), so that the reaper fails the job
    (worker_lost) when this worker dies, instead of leaving it running for ever."""
    reg, s = registry(), get_settings()
    token = reg.acquire_lock(job_id, s.job_lock_ttl_s)
    if token is None:
        return "locked"  # another delivery of this job runs it
    try:
        with LockKeeper(reg, job_id, token, s.job_lock_ttl_s):
            status = reg.start_job(job_id)
            if status != "started":
                return status
            reg.update_job(job_id, stage="segmenting")
            out = _segment(artifact, sha256, images, score_threshold, fmt, name, version)
            if "error" in out:
                reg.finish_job(job_id, "failed", error=out["error"])
                return "failed"
            job = reg.get_job(job_id)
            reg.finish_job(job_id, "succeeded", output={"model": job["params"]["model"],
                                                        "version": job["params"]["version"], "images": out["results"]})
            return "succeeded"
    finally:
        reg.release_lock(job_id, token)


@celery_app.task(name=EXPORT_TASK, acks_late=False)
def export(name: str, version: int, fmt: str) -> dict[str, Any]:
    """Export a registered version once (stored_export): {"export": {key, sha256, size_bytes}} or
    {"error": {code, message}}."""
    from models.errors import UplvpError

    try:
        return {"export": stored_export(registry(), name, version, fmt)[0]}
    except NotFound as exc:
        return {"error": {"code": "unknown_version", "message": str(exc)}}
    except ArtifactError as exc:
        return {"error": {"code": "artifact_unavailable", "message": str(exc)}}
    except UplvpError as exc:
        return {"error": {"code": exc.code, "message": str(exc)}}


def _warm_photo() -> bytes:
    """A 512x384 JPEG (the shape of most photos once resized): what a warm-up segments."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.linear_gradient("L").resize((512, 384)).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


@celery_app.task(name=WARM_TASK, acks_late=False)
def warm(name: str | None = None, version: int | None = None) -> list[str]:
    """Load `name` v`version` (or, without a name, every model's production version, as many as the cache
    holds) the way POST /segment would, and segment one photo with it; returns what was warmed."""
    from models.pipeline import segment as run_segment

    reg, s = registry(), get_settings()
    try:
        if name is not None and version is not None:
            recs = [reg.get_version(name, version)]
        else:
            production = [(n, reg.aliases(n).get("production")) for n in reg.model_names()]
            recs = [reg.get_version(n, v) for n, v in production if v is not None][: s.model_cache_size]
    except NotFound as exc:
        log.info("nothing to warm: %s", exc)
        return []
    warmed, photo = [], _warm_photo()
    for rec in recs:
        if _loaded(rec):  # loaded means warmed already: a promote must not put a warm-up before the next request
            warmed.append(f"{rec['name']}:{rec['version']}")
            continue
        try:
            run_segment(_predictor(rec["artifact"], rec["sha256"], rec["name"], rec["version"]),
                        [("warm.jpg", photo)], 1.0, "json")
            warmed.append(f"{rec['name']}:{rec['version']}")
        except Exception as exc:  # noqa: BLE001 - a model that cannot load fails its own requests, not this
            log.warning("warm-up of %s v%s failed: %s", rec["name"], rec["version"], exc)
    return warmed
