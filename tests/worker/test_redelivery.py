"""A job whose worker dies mid-training is resumed from its last checkpoint by the next delivery."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from app.dataset import ZipLimits, inspect_dataset, safe_extract
from app.registry import P, Registry
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


def test_killed_worker_job_resumes_from_checkpoint(registry: Registry, service_env: dict[str, str], client: Any,
                                                   voc_zip: bytes, tmp_path: Path) -> None:
    job_id = registry.new_job_id()
    (tmp_path / "d.zip").write_bytes(voc_zip)
    safe_extract(tmp_path / "d.zip", registry.job_dir(job_id) / "dataset", ZipLimits())
    layout = inspect_dataset(registry.job_dir(job_id) / "dataset")
    params = {k: (v if k == "backbone" else float(v) if "." in v else int(v)) for k, v in TINY.items()}
    params = {**params, "backbone_weights": params.pop("backbone"), "epochs": 30, "max_size": 160}
    registry.create_job(job_id, "resumed", params, {**layout.to_dict(), "sha256": "0" * 64}, None)

    log = tmp_path / "workers.log"
    first = _worker(service_env, log, "doomed")
    celery = client.app.state.celery
    celery.send_task(FINETUNE_TASK, args=[job_id], task_id=job_id, queue=QUEUE)
    _wait(lambda: registry.get_job(job_id)["epoch"] >= 3, 90, "epoch 3")
    first.kill()  # SIGKILL: no cleanup, the message stays unacked, the lock stays set
    first.wait()
    job = registry.get_job(job_id)
    assert job["state"] == "running" and (registry.job_dir(job_id) / "run" / "checkpoint.pt").is_file()
    registry.r.delete(f"{P}job:{job_id}:lock")  # the dead run's lock expires (30 s here; skipped)

    second = _worker(service_env, log, "heir")
    try:
        # Redis would redeliver the unacked message after the visibility timeout; send it again instead.
        res = celery.send_task(FINETUNE_TASK, args=[job_id], queue=QUEUE)
        assert res.get(timeout=120) == "succeeded", log.read_text()[-3000:]
    finally:
        second.terminate()
        second.wait(timeout=30)
    job = registry.get_job(job_id)
    assert job["state"] == "succeeded" and job["attempts"] == 2
    assert job["result"]["resumed_from_epoch"] >= 2  # continued, not restarted
    rec = registry.get_version("resumed", job["result"]["version"])
    assert rec["params"]["epochs"] == 30
