"""With an S3 store, what a job needs goes through it: a worker on another host rebuilds the job's work dir from
the uploaded zip and the last resume files in the store (real Redis, real SeaweedFS)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from app.registry import Registry, connect
from app.storage import S3Store, StoreUnavailable, file_sha256
from tests.service_fixtures import SeaweedS3
from worker.tasks import JobReporter, job_files


def _host(settings: Any, s3: SeaweedS3, root: Path, prefix: str) -> Registry:
    """One host's registry: the shared Redis and bucket, its own data dir and cache."""
    return Registry(connect(settings.redis_url), root, S3Store(s3.BUCKET, prefix, root / "cache",
                                                               endpoint_url=s3.endpoint))


def test_another_host_rebuilds_the_job_from_the_store(settings: Any, s3_server: SeaweedS3, voc_zip: bytes,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    a = _host(settings, s3_server, tmp_path / "a", "jobfiles")
    b = _host(settings, s3_server, tmp_path / "b", "jobfiles")
    job_id = a.new_job_id()
    upload = tmp_path / "dataset.zip"
    upload.write_bytes(voc_zip)
    stored = {**a.put_job_file(job_id, upload, "dataset.zip"), "dir": "dataset"}  # what the API does
    a.create_job(job_id, "jobfiles", {"epochs": 1}, {"uploads": {"dataset": stored}}, None)
    job = a.get_job(job_id)

    # host A trains: its resume checkpoint goes to the store, at most every checkpoint_upload_s
    ckpt = a.job_dir(job_id) / "run" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"epoch 1")
    reporter = JobReporter(a, job_id, epochs=3, checkpoint_upload_s=3600)
    reporter.on_checkpoint(ckpt)
    ckpt.write_bytes(b"epoch 2")
    reporter.on_checkpoint(ckpt)  # within the interval: not uploaded again
    assert b.store.fetch(b.job_key(job_id, Registry.JOB_CHECKPOINT)).read_bytes() == b"epoch 1"
    stray = tmp_path / "elsewhere" / "checkpoint.pt"  # not one of the job's resume files: ignored
    stray.parent.mkdir()
    stray.write_bytes(b"other")
    reporter.on_checkpoint(stray)
    # a UPLVP job's earlier stages go too: the pre-training's checkpoint as it is written, the pseudo masks
    # once written, at the next stage change (with the checkpoint the throttle held back)
    run = a.job_dir(job_id) / "run"
    (run / "pretrain").mkdir()
    (run / "pretrain" / "pretrain.pt").write_bytes(b"pretrain epoch 1")
    (run / "pretrain" / "pseudo.json").write_text('{"masks": []}')
    reporter.on_checkpoint(run / "pretrain" / "pretrain.pt")
    assert b.store.fetch(b.job_key(job_id, "pretrain.pt")).read_bytes() == b"pretrain epoch 1"
    assert not b.store.exists(b.job_key(job_id, "pseudo.json"))
    reporter.on_stage("finetuning")
    assert b.store.fetch(b.job_key(job_id, "pseudo.json")).read_text() == '{"masks": []}'
    assert b.store.fetch(b.job_key(job_id, Registry.JOB_CHECKPOINT)).read_bytes() == b"epoch 2"
    assert not b.store.exists(b.job_key(job_id, "teacher.pt"))  # not a `self` job: no teacher
    ckpt.write_bytes(b"epoch 3")
    JobReporter(a, job_id, epochs=3, checkpoint_upload_s=0).on_checkpoint(ckpt)

    # host A dies; host B has never seen the job: its work dir comes from the store
    job_files(b, job)
    work_b = b.job_dir(job_id)
    names = sorted(p.name for p in (work_b / "dataset").rglob("*") if p.is_file())
    assert "annotations.json" in names and any(n.endswith(".jpg") for n in names)
    assert (work_b / "run" / "checkpoint.pt").read_bytes() == b"epoch 3"
    assert (work_b / "run" / "pretrain" / "pseudo.json").read_text() == '{"masks": []}'
    assert (work_b / "run" / "pretrain" / "pretrain.pt").read_bytes() == b"pretrain epoch 1"
    assert not (work_b / "run" / "teacher").exists()
    job_files(b, job)  # already there: nothing fetched again
    assert file_sha256(work_b / "run" / "checkpoint.pt") == file_sha256(ckpt)

    # the job ends without any worker's clean-up (cancelled while queued again; the reaper's failures take the
    # same path, Registry._finished): its files leave the store all the same
    assert a.request_cancel(job_id) == "cancelled_now"
    assert not a.store.exists(stored["key"])
    assert not any(a.store.exists(a.job_key(job_id, n)) for n in Registry.JOB_RESUME_FILES)


def test_a_lost_upload_is_a_storage_error(settings: Any, s3_server: SeaweedS3, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    host = _host(settings, s3_server, tmp_path, "lost")
    job = {"id": f"lost{int(time.time() * 1000)}", "dataset": {"uploads": {"dataset": {
        "key": "jobs/x/dataset.zip", "sha256": "0" * 64, "size_bytes": 1, "dir": "dataset"}}}}
    with pytest.raises(StoreUnavailable, match="upload 'dataset' cannot be read from the store"):
        job_files(host, job)
