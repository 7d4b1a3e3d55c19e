"""Two worker hosts sharing only Redis and an S3 bucket (real Redis, real SeaweedFS, real Celery workers in
separate processes with separate data dirs): both take jobs, and a job whose host is SIGKILLed resumes on the
other host from the last checkpoint in the store. bench/scale.py measures the same with more jobs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from app.registry import Registry
from tests.cluster import Cluster, submit_finetune, wait_for

LOCK_TTL_S = 5


def test_a_job_survives_the_loss_of_its_host(voc_zip: bytes, tmp_path: Path) -> None:
    with Cluster(tmp_path, lock_ttl_s=LOCK_TTL_S) as cluster:
        hosts = [cluster.start_host(), cluster.start_host()]
        http = httpx.Client(base_url=cluster.api_url, timeout=60)
        job = lambda jid: http.get(f"/jobs/{jid}").json()  # noqa: E731
        long_id = submit_finetune(http, voc_zip, "long", epochs=40)
        short_id = submit_finetune(http, voc_zip, "short", epochs=2)

        def both_running() -> bool:
            jobs = [job(long_id), job(short_id)]
            return all(j["state"] in ("running", "succeeded") and (j.get("device") or {}).get("worker")
                       for j in jobs)

        wait_for(both_running, 90, "both jobs to start")
        runs_on = {jid: job(jid)["device"]["worker"] for jid in (long_id, short_id)}
        assert set(runs_on.values()) == {h.worker for h in hosts}  # each host took one job

        store = cluster.registry(tmp_path / "reader")
        wait_for(lambda: job(long_id)["epoch"] >= 3, 90, "the long job's third epoch")
        epoch_at_kill = job(long_id)["epoch"]
        victim = next(h for h in hosts if h.worker == runs_on[long_id])
        other = next(h for h in hosts if h is not victim)
        cluster.kill_host(victim)
        t_kill = time.monotonic()

        def resumed() -> dict[str, Any] | None:
            j = job(long_id)
            return j if j["state"] == "running" and j["device"]["worker"] == other.worker and j["attempts"] == 2 \
                else None

        wait_for(resumed, 120, "the long job to run again on the other host")
        back_s = time.monotonic() - t_kill
        done = wait_for(lambda: (j := job(long_id))["state"] in ("succeeded", "failed") and j, 120, "the long job to end")
        assert done["state"] == "succeeded", done.get("error")
        # it went on from a checkpoint the dead host had stored, not from the start
        assert epoch_at_kill - 2 <= done["result"]["resumed_from_epoch"] <= epoch_at_kill
        assert done["result"]["resumed_from_epoch"] >= 1
        assert back_s < LOCK_TTL_S + 60, back_s  # the lock's expiry, the short job's end, the start of the run
        assert job(short_id)["state"] == "succeeded"
        # the two models are in the registry, and the jobs' work files left the store
        assert http.get("/models/long").json()["versions"] == [1]
        assert store.remote_store
        assert not any(store.store.exists(store.job_key(long_id, n)) for n in Registry.JOB_RESUME_FILES)
