"""Jobs and models survive a Redis restart (append-only file in Redis' data dir)."""

from __future__ import annotations

import time
from typing import Any


def test_restart_redis_keeps_jobs_and_models(client: Any, trained: dict[str, Any], redis_server: Any) -> None:
    job_id = trained["job"]["id"]
    before_jobs = client.get("/jobs").json()["total"]
    before_models = client.get("/models").json()
    time.sleep(1.2)  # appendfsync everysec
    redis_server.restart()
    job = client.get(f"/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["result"] == trained["job"]["result"]
    assert client.get("/jobs").json()["total"] == before_jobs
    assert client.get("/models").json() == before_models
    deadline = time.monotonic() + 30  # the worker reconnects and its heartbeat comes back
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "worker did not come back after the Redis restart"
        time.sleep(0.5)
