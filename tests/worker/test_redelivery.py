"""A job whose worker dies mid-training is resumed from its last checkpoint by the next delivery."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from app.dataset import ZipLimits, inspect_dataset, safe_extract
from app.registry import Registry
from tests.service_fixtures import ROOT, TINY
from worker.celery_app import FINETUNE_TASK

QUEUE = "crash-test"  # only this test's workers listen here, so the session worker is untouched


def _worker(env: dict[str, str], log: Path, name: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", QUEUE,
                                 "-c", "1", "--pool", "solo", "-n", f"{name}-{os.getpid()}@%h"], cwd=ROOT,
                                env=dict(os.environ, **env, OMP_NUM_THREADS="1"), stdout=out, stderr=subprocess.STDOUT)


def _wait(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_killed_worker_job_is_requeued_and_resumes_from_checkpoint(registry: Registry, service_env: dict[str, str],
                                                                   client: Any, voc_zip: bytes, tmp_path: Path) -> None:
    """SIGKILL mid-training: the lock expires (4 s here), a live worker's reaper re-queues the job
    (heartbeat 1 s), and the next run continues from the last epoch checkpoint; bounded time."""
    job_id = registry.new_job_id()
    (tmp_path / "d.zip").write_bytes(voc_zip)
    safe_extract(tmp_path / "d.zip", registry.job_dir(job_id) / "dataset", ZipLimits())
    layout = inspect_dataset(registry.job_dir(job_id) / "dataset")
    params = {k: (v if k == "backbone" else float(v) if "." in v else int(v)) for k, v in TINY.items()}
    params = {**params, "backbone_weights": params.pop("backbone"), "epochs": 30, "max_size": 160}
    registry.create_job(job_id, "resumed", params, {**layout.to_dict(), "sha256": "0" * 64}, None)
    log = tmp_path / "workers.log"
    doomed = _worker({**service_env, "UPLVP_JOB_LOCK_TTL_S": "4"}, log, "doomed")
    try:
        client.app.state.celery.send_task(FINETUNE_TASK, args=[job_id], task_id=job_id, queue=QUEUE)
        _wait(lambda: registry.get_job(job_id)["epoch"] >= 3, 90, "epoch 3")
    finally:
        doomed.kill()  # SIGKILL: no cleanup, the message stays unacked, the lock stays until it expires
        doomed.wait()
    killed_at = time.monotonic()
    job = registry.get_job(job_id)
    assert job["state"] == "running" and (registry.job_dir(job_id) / "run" / "checkpoint.pt").is_file()
    # No manual help: the session's worker (queues train, infer) reaps and runs it.
    _wait(lambda: registry.get_job(job_id)["state"] in ("succeeded", "failed"), 120, "the job to finish")
    recovered_in = time.monotonic() - killed_at
    job = registry.get_job(job_id)
    assert job["state"] == "succeeded" and job["attempts"] == 2, job
    assert job["result"]["resumed_from_epoch"] >= 2  # continued, not restarted
    assert recovered_in < 90, recovered_in
    rec = registry.get_version("resumed", job["result"]["version"])
    assert rec["params"]["epochs"] == 30


def test_killed_infer_worker_fails_its_async_segment_job(registry: Registry, service_env: dict[str, str],
                                                         client: Any, tmp_path: Path) -> None:
    """SIGKILL while an async segment job runs: its lock expires (4 s here) and a live worker's reaper fails
    it with worker_lost (its images travel in the task only), within a bounded time, instead of it staying
    `running` for ever."""
    import base64
    import io

    from PIL import Image
    from skimage import data

    from models.config import ModelConfig, TrainConfig
    from models.engine.checkpoint import save_checkpoint
    from models.nets.build import build_model
    from worker.celery_app import SEGMENT_JOB_TASK

    # a full-width model at 640 px, so that segmenting 16 photos on one thread takes seconds, not milliseconds
    cfg = ModelConfig(num_classes=1, backbone_weights="none", num_kernels=100)
    ckpt = save_checkpoint(tmp_path / "heavy.pt", build_model(cfg), cfg, TrainConfig(short_side=640, max_long_side=960),
                           [{"id": 1, "name": "thing"}], [])
    rec = registry.register_version("heavy", ckpt, {}, [{"id": 1, "name": "thing"}], {}, None, "0" * 64, "job-heavy")
    jpg = io.BytesIO()
    Image.fromarray(data.astronaut()).save(jpg, format="JPEG")
    payload = [[f"p{i}.jpg", base64.b64encode(jpg.getvalue()).decode()] for i in range(16)]
    job_id = registry.new_job_id()
    registry.create_job(job_id, "heavy", {"model": "heavy", "version": rec["version"], "images": 16},
                        {"num_images": 16}, f"heavy:{rec['version']}", kind="segment")
    doomed = _worker({**service_env, "UPLVP_JOB_LOCK_TTL_S": "4"}, tmp_path / "workers.log", "doomed-infer")
    try:
        client.app.state.celery.send_task(SEGMENT_JOB_TASK, queue=QUEUE, args=[
            job_id, rec["artifact"], rec["sha256"], payload, 0.3, "json", "heavy", rec["version"]])
        _wait(lambda: registry.get_job(job_id)["state"] == "running", 90, "the segment job to run")
    finally:
        doomed.kill()
        doomed.wait()
    killed_at = time.monotonic()
    assert registry.get_job(job_id)["state"] == "running"
    try:
        _wait(lambda: registry.get_job(job_id)["state"] != "running", 60, "the reaper")
        job = registry.get_job(job_id)
        assert job["state"] == "failed" and job["error"]["code"] == "worker_lost", job
        assert "send them again" in job["error"]["message"] and time.monotonic() - killed_at < 30
    finally:
        registry.delete_version("heavy", rec["version"])


def test_an_async_segment_job_whose_message_expires_unstarted_is_failed(registry: Registry,
                                                                      service_env: dict[str, str],
                                                                      client: Any, tmp_path: Path) -> None:
    """No infer worker on its queue until after the job's expiry: the worker that comes then drops the
    expired message (it never runs), and a live worker's reaper fails the job with not_started in a
    bounded time, instead of it staying `queued` for ever."""
    from worker.celery_app import SEGMENT_JOB_TASK

    job_id = registry.new_job_id()
    registry.create_job(job_id, "late", {"model": "late", "version": 1, "images": 1}, {"num_images": 1}, "late:1",
                        kind="segment")
    client.app.state.celery.send_task(SEGMENT_JOB_TASK, queue=QUEUE, task_id=job_id, expires=2, args=[
        job_id, "models/late/v1/model.pt", "0" * 64, [["a.jpg", ""]], 0.3, "json", "late", 1])
    time.sleep(2.5)
    late = _worker({**service_env, "UPLVP_SEGMENT_JOB_EXPIRY_S": "2", "UPLVP_HEARTBEAT_S": "1"},
                   tmp_path / "workers.log", "late-infer")
    try:
        _wait(lambda: registry.get_job(job_id)["state"] != "queued", 60, "the reaper")
        job = registry.get_job(job_id)
        assert job["state"] == "failed" and job["error"]["code"] == "not_started", job
        assert int(job.get("attempts") or 0) == 0  # never started
    finally:
        late.kill()
        late.wait()
