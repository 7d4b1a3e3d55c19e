"""Faults against the real stack: Redis restarted mid-job, an unwritable model store, API restarts,
cancels in each stage, and two jobs on one worker."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.service_fixtures import TINY, post_finetune, wait_job


def test_redis_restart_mid_job_the_job_completes(client: Any, voc_zip: bytes, redis_server: Any) -> None:
    job_id = post_finetune(client, voc_zip, name="survivor", epochs="40").json()["id"]
    wait_job(client, job_id, until=lambda j: j["state"] == "running" and j["epoch"] >= 2, timeout_s=90)
    redis_server.restart()  # SIGTERM (AOF flushed), start again on the same port and dir
    job = wait_job(client, job_id, timeout_s=180)
    assert job["state"] == "succeeded" and job["epoch"] == 40, job
    assert client.get(f"/models/survivor/versions/{job['result']['version']}").status_code == 200


def test_unwritable_model_store_fails_the_job_and_keeps_earlier_versions(client: Any, voc_zip: bytes,
                                                                         trained: dict[str, Any]) -> None:
    data_dir: Path = client.app.state.settings.data_dir
    blocker = data_dir / "models" / "blocked"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the model's folder must go: mkdir fails like on a full or read-only disk")
    try:
        job = wait_job(client, post_finetune(client, voc_zip, name="blocked").json()["id"], timeout_s=120)
    finally:
        blocker.unlink()
    assert job["state"] == "failed" and job["error"]["code"] == "storage_error", job
    assert "could not store the model" in job["error"]["message"]
    assert client.get("/models/blocked").status_code == 404  # nothing half-registered
    v = trained["job"]["result"]["version"]
    ok = client.get(f"/models/voc/versions/{v}/download")  # sha256-checked: the earlier version is intact
    assert ok.status_code == 200 and ok.headers["x-checksum-sha256"]


def test_api_restart_loses_nothing(client: Any, settings: Any, voc_zip: bytes) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    job_id = post_finetune(client, voc_zip, name="api-restart", epochs="20").json()["id"]
    with TestClient(create_app(settings)) as second:  # a new API process state: only Redis is shared
        job = wait_job(second, job_id, timeout_s=120)
        assert job["state"] == "succeeded"
        assert second.get("/jobs", params={"name": "api-restart"}).json()["total"] == 1


def test_two_finetunes_on_one_worker_run_one_after_the_other(client: Any, voc_zip: bytes) -> None:
    a = post_finetune(client, voc_zip, name="serial", epochs="6").json()["id"]
    b = post_finetune(client, voc_zip, name="serial", epochs="6").json()["id"]
    ja, jb = wait_job(client, a, timeout_s=120), wait_job(client, b, timeout_s=120)
    assert ja["state"] == jb["state"] == "succeeded"
    first, second = sorted((ja, jb), key=lambda j: j["started_at"])
    assert second["started_at"] >= first["finished_at"]
    assert sorted([ja["result"]["version"], jb["result"]["version"]]) == client.get("/models/serial").json()["versions"]


@pytest.fixture(scope="module")
def many_photos_zip(photos_zip: bytes) -> bytes:
    """The three photos 12 times over (crops), so that proposing takes long enough to cancel in."""
    from PIL import Image

    src = zipfile.ZipFile(io.BytesIO(photos_zip))
    photos = [Image.open(io.BytesIO(src.read(n))) for n in src.namelist() if n.endswith(".jpg")]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(12):
            for j, im in enumerate(photos):
                crop = im.crop((i * 5, i * 3, im.width - i * 4, im.height - i * 2))
                out = io.BytesIO()
                crop.save(out, format="JPEG")
                zf.writestr(f"p{i}_{j}.jpg", out.getvalue())
    return buf.getvalue()


@pytest.mark.parametrize("stage", ["proposing", "pretraining", "finetuning"])
def test_cancel_in_each_stage(client: Any, voc_zip: bytes, many_photos_zip: bytes, stage: str) -> None:
    resp = client.post("/finetune", files={"dataset": ("d.zip", voc_zip, "application/zip"),
                                           "unlabeled": ("u.zip", many_photos_zip, "application/zip")},
                       data={"name": f"cancel-{stage}", **TINY, "base": "pretrained", "epochs": "300",
                             "pretrain_epochs": "1" if stage == "finetuning" else "300", "max_masks": "3"})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    wait_job(client, job_id, until=lambda j: j["stage"] == stage or j["state"] != "queued" and
             j["state"] != "running", timeout_s=180)
    t0 = time.monotonic()
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 202
    job = wait_job(client, job_id, timeout_s=60)
    assert job["state"] == "cancelled" and job["stage"] == stage, job
    assert time.monotonic() - t0 < 30
    assert client.get(f"/models/cancel-{stage}").status_code == 404
