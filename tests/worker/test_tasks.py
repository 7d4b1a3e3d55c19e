"""The finetune task is idempotent on its job id; cancellation and the run lock (real Redis)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from app.registry import P, Registry
from worker.celery_app import FINETUNE_TASK
from worker.tasks import JobReporter, LockKeeper


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


def test_reporter_reads_the_cancel_flag(registry: Registry) -> None:
    job_id = registry.new_job_id()
    registry.create_job(job_id, "reporter", {"epochs": 2}, {}, None)
    assert registry.start_job(job_id) == "started" and registry.start_job(job_id) == "running"
    rep = JobReporter(registry, job_id, epochs=2, min_interval_s=0)
    rep.on_stage("finetuning")
    rep.on_step(0, 0, 4, {"loss": 2.0})
    job = registry.get_job(job_id)
    assert job["stage"] == "finetuning" and job["step"] == 1 and job["losses"] == {"loss": 2.0}
    assert 0.02 < job["progress"] < 0.95 and job["attempts"] == 2
    assert rep.should_stop() is False
    assert registry.request_cancel(job_id) == "requested" and rep.should_stop() is True
    registry.finish_job(job_id, "cancelled")


def test_lock_keeper_refreshes_and_notices_a_stolen_lock(registry: Registry) -> None:
    job_id = registry.new_job_id()
    token = registry.acquire_lock(job_id, 2)
    with LockKeeper(registry, job_id, token, 2) as keeper:
        time.sleep(3)  # past the lock's 2 s expiry: only the keeper's refreshes keep it
        assert registry.r.get(f"{P}job:{job_id}:lock") == token and not keeper.lost.is_set()
        registry.r.set(f"{P}job:{job_id}:lock", "someone-else")
        time.sleep(1)
        rep = JobReporter(registry, job_id, epochs=1, lock_lost=keeper.lost.is_set)
        assert keeper.lost.is_set() and rep.lost_lock and rep.should_stop()
    registry.r.delete(f"{P}job:{job_id}:lock")


def test_reaper_requeues_a_running_job_without_lock_then_fails_it(registry: Registry) -> None:
    job_id = registry.new_job_id()
    registry.create_job(job_id, "orphan", {"epochs": 1}, {}, None)
    registry.start_job(job_id)  # attempts 1, running, and no lock: its worker is gone
    assert (job_id, "finetune", "requeued") in registry.requeue_orphans(max_attempts=2)
    assert registry.get_job(job_id)["state"] == "queued"
    registry.start_job(job_id)  # attempts 2
    token = registry.acquire_lock(job_id, 30)
    assert all(j != job_id for j, _, _ in registry.requeue_orphans(max_attempts=2))  # locked: alive
    registry.release_lock(job_id, token)
    assert (job_id, "finetune", "failed") in registry.requeue_orphans(max_attempts=2)
    job = registry.get_job(job_id)
    assert job["state"] == "failed" and job["error"]["code"] == "worker_lost"
    assert job_id not in registry.r.smembers(f"{P}jobs:active")
    segment_job = registry.new_job_id()  # an async segment job holds the lock too; without it, it fails at once
    registry.create_job(segment_job, "orphan", {}, {}, None, kind="segment")
    token = registry.acquire_lock(segment_job, 30)
    registry.start_job(segment_job)
    assert all(j != segment_job for j, _, _ in registry.requeue_orphans(max_attempts=2))  # locked: alive
    assert registry.get_job(segment_job)["state"] == "running"
    registry.release_lock(segment_job, token)
    assert (segment_job, "segment", "failed") in registry.requeue_orphans(max_attempts=2)  # not re-sent: no images
    job = registry.get_job(segment_job)
    assert job["state"] == "failed" and job["error"]["code"] == "worker_lost" and "send them again" in \
        job["error"]["message"]


def test_reaper_fails_an_async_segment_job_that_no_worker_started_in_time(registry: Registry) -> None:
    """Its message expires with it (lost with a worker that took it, or no infer worker up): nothing will
    run it, so it must not stay queued for ever. Training jobs and running jobs are not its business."""
    lost, fresh, training, running = (registry.new_job_id() for _ in range(4))
    for job_id, kind in ((lost, "segment"), (training, "finetune"), (running, "segment")):
        registry.create_job(job_id, "unstarted", {}, {}, None, kind=kind)
    token = registry.acquire_lock(running, 30)  # alive: a live worker's reaper leaves it alone
    registry.start_job(running)
    time.sleep(1.1)
    registry.create_job(fresh, "unstarted", {}, {}, None, kind="segment")  # created just now
    assert registry.fail_unstarted(max_age_s=1.0) == [lost]
    job = registry.get_job(lost)
    assert job["state"] == "failed" and job["error"]["code"] == "not_started"
    assert "UPLVP_SEGMENT_JOB_EXPIRY_S" in job["error"]["message"] and lost not in registry.r.smembers(f"{P}jobs:active")
    assert [registry.get_job(j)["state"] for j in (fresh, training, running)] == ["queued", "queued", "running"]
    assert registry.start_job(lost) == "failed"  # a late delivery finds it failed and does not run it
    for job_id in (fresh, training, running):
        registry.finish_job(job_id, "cancelled")
    registry.release_lock(running, token)


def test_budgeted_finetune_reports_progress_and_eta_from_its_budget(registry: Registry) -> None:
    job_id = registry.new_job_id()
    registry.create_job(job_id, "budget", {"epochs": 0, "time_budget_min": 10}, {}, None)
    registry.start_job(job_id)
    rep = JobReporter(registry, job_id, epochs=0, min_interval_s=0, time_budget_s=600.0)
    rep.on_stage("finetuning")
    rep.on_plan({"epochs": 40, "steps": 1000, "steps_per_epoch": 25, "time_budget_s": 600.0})
    assert registry.get_job(job_id)["epochs"] == 40  # the planned epochs are shown, not the 0 asked for
    rep._stage_t0 -= 300  # half the budget has gone by
    rep.on_step(3, 24, 25, {"loss": 1.0})  # 100 of 1000 steps: the clock says 50 %
    job = registry.get_job(job_id)
    assert 295 <= job["eta_s"] <= 300  # the budget's end, not an extrapolation of the steps
    assert abs(job["progress"] - (0.02 + 0.93 * 0.5)) < 0.01
    registry.finish_job(job_id, "cancelled")


def test_segment_serves_the_onnx_export_once_it_exists(registry: Registry, settings: Any, trained: dict[str, Any],
                                                        voc_dir: Any, monkeypatch: Any) -> None:
    """Backend onnx: a version without an export is served by PyTorch at once and its export is asked for;
    once the export is stored, the same request runs under ONNX Runtime and gives the same instances."""
    import base64

    import worker.tasks as tasks

    monkeypatch.setattr(tasks, "get_settings", lambda: settings.model_copy(update={"infer_backend": "onnx"}))
    monkeypatch.setattr(tasks, "_registry", registry)
    monkeypatch.setattr(tasks, "_predictors", None)
    monkeypatch.setattr(tasks, "_exports_asked", set())
    asked: list[tuple[str, int]] = []
    monkeypatch.setattr(tasks, "_ask_export", lambda name, version: asked.append((name, version)))
    src = registry.get_version("voc", trained["job"]["result"]["version"])
    rec = registry.register_version("onnxserve", registry.fetch_artifact(src), {}, src["categories"], {}, None,
                                    "0" * 64, "job-onnxserve")
    photo = [["voc_0.jpg", base64.b64encode((voc_dir / "images" / "voc_0.jpg").read_bytes()).decode()]]
    args = (rec["artifact"], rec["sha256"], photo, 0.0, "json", "onnxserve", rec["version"])
    try:
        first = tasks._segment(*args)
        assert first["backend"] == "torch" and asked == [("onnxserve", rec["version"])]
        tasks._segment(*args)
        assert len(asked) == 1  # asked once per process
        tasks.stored_export(registry, "onnxserve", rec["version"])  # what the export task does
        second = tasks._segment(*args)
        assert second["backend"] == "onnx"
        want, got = first["results"][0]["instances"], second["results"][0]["instances"]
        assert len(got) == len(want) > 0
        assert [i["score"] for i in got[:5]] == pytest.approx([i["score"] for i in want[:5]], abs=1e-3)
        assert got[0]["segmentation"]["size"] == [375, 500] and isinstance(got[0]["polygons"], list)
        # the warm-up (an infer worker's start, a promote, a fresh version) loads the version the same way
        monkeypatch.setattr(tasks, "_predictors", None)
        assert tasks.warm("onnxserve", rec["version"]) == [f"onnxserve:{rec['version']}"]
        assert (rec["artifact"], rec["sha256"], "onnx") in tasks._predictors
        # a version already loaded is not warmed again: a promote must not put a model call before the next request
        import models.pipeline as pipeline

        ran: list[int] = []
        real_segment = pipeline.segment
        monkeypatch.setattr(pipeline, "segment", lambda *a, **k: ran.append(1) or real_segment(*a, **k))
        assert tasks.warm("onnxserve", rec["version"]) == [f"onnxserve:{rec['version']}"] and ran == []
        # without a version: the production versions, as many as the cache holds
        production = {f"{n}:{registry.aliases(n)['production']}" for n in registry.model_names()
                      if "production" in registry.aliases(n)}
        warmed = tasks.warm()
        assert set(warmed) <= production and len(warmed) == min(len(production), settings.model_cache_size)
    finally:
        registry.delete_version("onnxserve", rec["version"])
        assert not registry.store.exists(f"models/onnxserve/v{rec['version']}/model.onnx")
