"""The finetune task is idempotent on its job id; cancellation and the run lock (real Redis)."""

from __future__ import annotations

from typing import Any

from app.registry import Registry
from worker.celery_app import FINETUNE_TASK
from worker.tasks import JobReporter


def test_run_lock_is_exclusive(registry: Registry) -> None:
    token = registry.acquire_lock("lock-test", 30)
    assert token and registry.acquire_lock("lock-test", 30) is None
    assert registry.refresh_lock("lock-test", token, 30) and not registry.refresh_lock("lock-test", "other", 30)
    registry.release_lock("lock-test", "other")  # not the holder: no effect
    assert registry.acquire_lock("lock-test", 30) is None
    registry.release_lock("lock-test", token)
    second = registry.acquire_lock("lock-test", 30)
    assert second
    registry.release_lock("lock-test", second)


def test_redelivered_finished_job_does_not_run_again(client: Any, trained: dict[str, Any]) -> None:
    job_id = trained["job"]["id"]
    versions = client.get("/models/voc").json()["versions"]
    res = client.app.state.celery.send_task(FINETUNE_TASK, args=[job_id], queue="train")
    assert res.get(timeout=60) == "succeeded"  # already finished: nothing trained, nothing registered
    assert client.get("/models/voc").json()["versions"] == versions
    assert client.get(f"/jobs/{job_id}").json()["result"] == trained["job"]["result"]


def test_reporter_reads_the_cancel_flag_and_notices_a_lost_lock(registry: Registry) -> None:
    job_id = registry.new_job_id()
    registry.create_job(job_id, "reporter", {"epochs": 2}, {}, None)
    assert registry.start_job(job_id) == "started" and registry.start_job(job_id) == "running"
    token = registry.acquire_lock(job_id, 30)
    rep = JobReporter(registry, job_id, token, epochs=2, lock_ttl_s=30, min_interval_s=0)
    rep.on_stage("finetuning")
    rep.on_step(0, 0, 4, {"loss": 2.0})
    job = registry.get_job(job_id)
    assert job["stage"] == "finetuning" and job["step"] == 1 and job["losses"] == {"loss": 2.0}
    assert 0.02 < job["progress"] < 0.95 and job["attempts"] == 2
    assert rep.should_stop() is False
    assert registry.request_cancel(job_id) == "requested" and rep.should_stop() is True
    registry.release_lock(job_id, token)
    registry.acquire_lock(job_id, 30)  # someone else took the lock
    rep._last_refresh = -1e9  # force a refresh on the next check
    assert rep.should_stop() is True and rep.lost_lock
    registry.finish_job(job_id, "cancelled")
