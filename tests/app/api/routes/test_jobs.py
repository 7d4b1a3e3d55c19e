"""Jobs: listing with filters and paging, unknown ids, cancelling a queued and a running job."""

from __future__ import annotations

import time
from typing import Any

from tests.app.api.routes.test_finetune import assert_error
from tests.service_fixtures import post_finetune, wait_job


def test_list_filters_and_paging(client: Any, trained: dict[str, Any]) -> None:
    job_id = trained["job"]["id"]
    page = client.get("/jobs", params={"state": "succeeded", "name": "voc"}).json()
    assert job_id in [j["id"] for j in page["items"]] and all(j["state"] == "succeeded" for j in page["items"])
    assert client.get("/jobs", params={"name": "no-such-model"}).json() == {"items": [], "total": 0, "offset": 0,
                                                                           "limit": 50}
    everything = client.get("/jobs").json()
    first = client.get("/jobs", params={"limit": 1}).json()
    assert first["total"] == everything["total"] and len(first["items"]) == 1
    assert first["items"][0]["id"] == everything["items"][0]["id"]  # newest first
    assert_error(client.get("/jobs", params={"state": "sleeping"}), 400, "invalid_request", "state")


def test_unknown_job_id(client: Any) -> None:
    assert_error(client.get("/jobs/nope"), 404, "unknown_job", "'nope'")
    assert_error(client.post("/jobs/nope/cancel"), 404, "unknown_job", "'nope'")


def test_cancel_queued_then_running(client: Any, voc_zip: bytes, trained: dict[str, Any]) -> None:
    long_job = post_finetune(client, voc_zip, name="long", epochs="500").json()["id"]
    running = wait_job(client, long_job, until=lambda j: j["state"] == "running" and j["step"] >= 1, timeout_s=90)
    assert running["stage"] == "finetuning" and 0 < running["progress"] < 1 and running["eta_s"] is not None
    queued = post_finetune(client, voc_zip, name="long").json()["id"]
    resp = client.post(f"/jobs/{queued}/cancel")
    assert resp.status_code == 200 and resp.json()["state"] == "cancelled"  # never starts

    t0 = time.monotonic()
    resp = client.post(f"/jobs/{long_job}/cancel")
    assert resp.status_code == 202 and resp.json()["cancel_requested"] is True
    job = wait_job(client, long_job, timeout_s=30)
    assert job["state"] == "cancelled" and job["epoch"] < 500, job
    assert time.monotonic() - t0 < 10  # within a training step (~0.1 s here), not an epoch
    assert client.get(f"/jobs/{queued}").json()["state"] == "cancelled"
    assert_error(client.post(f"/jobs/{long_job}/cancel"), 409, "job_finished", "cancelled")
    # The worker went on to the cancelled queued job's message and left it cancelled (no run, no version).
    wait_job(client, queued, until=lambda j: not (client.app.state.registry.job_dir(queued)).exists(), timeout_s=30)
    assert client.get("/models/long").status_code == 404
