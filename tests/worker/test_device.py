"""The worker's device: UPLVP_DEVICE, the refusal to start without the GPU it names, the device in job records,
and out-of-memory jobs that fail with a hint while the worker lives on (real Redis)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from app.registry import Registry
from tests.service_fixtures import ROOT, free_port
from worker import tasks


def test_worker_refuses_to_start_on_a_missing_gpu(tmp_path: Any) -> None:
    env = dict(os.environ, UPLVP_DEVICE="cuda", CUDA_VISIBLE_DEVICES="", UPLVP_DATA_DIR=str(tmp_path),
               REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "train", "-c", "1",
                          "--pool", "solo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "UPLVP_DEVICE=cuda" in out.stderr and "no CUDA GPU" in out.stderr and "does not start" in out.stderr


def _job(registry: Registry, name: str = "oom") -> str:
    job_id = registry.new_job_id()
    registry.create_job(job_id, name, {"epochs": 1, "batch_size": 0, "image_size": 0}, {}, None)
    return job_id


def test_an_out_of_memory_job_fails_with_a_hint_and_the_worker_goes_on(registry: Registry,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    released: list[Any] = []
    monkeypatch.setattr("models.engine.device.release_memory", lambda device=None: released.append(device))

    def oom(*_: Any) -> dict[str, Any]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    job_id = _job(registry)
    assert tasks.run_training_job(job_id, registry, lambda: False, oom) == "failed"  # returns: the worker lives on
    job = registry.get_job(job_id)
    assert job["state"] == "failed" and job["error"]["code"] == "out_of_memory"
    assert "smaller batch_size or image_size" in job["error"]["message"] and released == ["cpu"]
    assert job["device"]["device"] == "cpu"  # the record says where it ran

    def broken(*_: Any) -> dict[str, Any]:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    # the next job runs; an error that is not about memory is not called one (the task fails it as internal)
    with pytest.raises(RuntimeError, match="shapes"):
        tasks.run_training_job(_job(registry), registry, lambda: False, broken)


def test_segment_out_of_memory_is_an_error_answer(monkeypatch: pytest.MonkeyPatch, registry: Registry) -> None:
    def oom(*_: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tasks, "_predictor", oom)
    monkeypatch.setattr(tasks, "registry", lambda: registry)
    out = tasks._segment("models/x/v1/model.pt", "0" * 64, [["a.jpg", ""]], 0.3, "json")
    assert out["error"]["code"] == "out_of_memory"


def test_worker_device_follows_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.core.config import get_settings

    monkeypatch.setattr(tasks, "_device", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tasks.worker_device() == "cpu" and tasks.worker_device_info()["device"] == "cpu"
    monkeypatch.setattr(tasks, "_device", None)
    monkeypatch.setenv("UPLVP_DEVICE", "cuda")
    get_settings.cache_clear()
    try:
        from models.engine.device import DeviceError

        with pytest.raises(DeviceError):
            tasks.worker_device()
    finally:
        monkeypatch.delenv("UPLVP_DEVICE")
        get_settings.cache_clear()
        monkeypatch.setattr(tasks, "_device", None)
