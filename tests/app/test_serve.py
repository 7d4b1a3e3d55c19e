"""`uplvp serve` (what `make run` runs): its own real Redis, a worker and the API, over real HTTP.

Ctrl-C stops all three; a second start on the same data dir finds the earlier jobs and models.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.service_fixtures import ROOT, TINY, free_port


def _serve(data_dir: Path, port: int, redis_port: int, log: Path, *extra: str,
           env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "UPLVP_REDIS_URL")}
    env.update(UPLVP_HEARTBEAT_S="1", OMP_NUM_THREADS="1", UPLVP_WORKER_THREADS="1", **(env_extra or {}))
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "models.cli", "serve", "--port", str(port), "--redis-port",
                                 str(redis_port), "--data-dir", str(data_dir), *extra], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_job(base: str, job_id: str, log: Path, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert job["state"] == "succeeded", (job, log.read_text()[-3000:])
    return job


def _ready(base: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"uplvp serve exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"not ready after {timeout_s} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _pids(pattern: str) -> list[str]:
    """Pids of processes whose command line matches the regular expression `pattern`."""
    return subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()


def _stop(proc: subprocess.Popen, ports: tuple[int, ...]) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: SIGINT to the foreground group
    assert proc.wait(timeout=60) == 0
    for port in ports:  # the API and Redis are gone with it
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"


def test_serve_runs_the_stack_and_keeps_state_across_restarts(tmp_path: Path, voc_zip: bytes) -> None:
    port, redis_port, log = free_port(), free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    proc = _serve(tmp_path / "data", port, redis_port, log)
    try:
        _ready(base, proc, log)
        assert httpx.get(f"{base}/docs").status_code == 200
        resp = httpx.post(f"{base}/finetune", files={"dataset": ("d.zip", voc_zip, "application/zip")},
                          data={"name": "served", **TINY}, timeout=60)
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        job = _wait_job(base, job_id, log)

        # Supervision: a Redis and a worker killed with SIGKILL are started again; nothing is lost.
        for pattern in (f"redis-server 127.0.0.1:{redis_port}", "-Q infer -n infer@"):
            pids = _pids(pattern)
            assert pids, pattern
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            time.sleep(1.5)
            _ready(base, proc, log)
            assert httpx.get(f"{base}/jobs/{job_id}").json()["state"] == "succeeded"
        assert "starting it again" in log.read_text()
        _stop(proc, (port, redis_port))
        assert (tmp_path / "data/redis/redis.log").exists()

        proc = _serve(tmp_path / "data", port, redis_port, log)
        _ready(base, proc, log)
        again = httpx.get(f"{base}/jobs/{job_id}").json()
        assert again["state"] == "succeeded" and again["result"] == job["result"]
        assert httpx.get(f"{base}/models/served").json()["versions"] == [job["result"]["version"]]
        _stop(proc, (port, redis_port))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
        for pid in _pids(f"redis-server 127.0.0.1:{redis_port}"):  # nothing may outlive a failed test
            os.kill(int(pid), signal.SIGKILL)


def test_worker_plan_puts_one_train_worker_on_each_gpu() -> None:
    from app.serve import worker_plan

    env = {"REDIS_URL": "redis://127.0.0.1:1/0"}
    cpu = worker_plan(0, "auto", env)
    assert [(w.name, w.queue, w.device) for w in cpu] == [("train", "train", "cpu"), ("infer", "infer", "cpu")]
    assert all("CUDA_VISIBLE_DEVICES" not in w.env and w.env["OMP_WAIT_POLICY"] == "PASSIVE" for w in cpu)
    assert [w.device for w in worker_plan(2, "cpu", env)] == ["cpu", "cpu"]  # UPLVP_DEVICE=cpu: GPUs left alone
    two = worker_plan(2, "auto", env)
    assert [(w.name, w.queue, w.env["CUDA_VISIBLE_DEVICES"], w.env["UPLVP_DEVICE"]) for w in two] == [
        ("train-gpu0", "train", "0", "cuda"), ("train-gpu1", "train", "1", "cuda"), ("infer-gpu0", "infer", "0", "cuda")]
    # a CUDA_VISIBLE_DEVICES given to `uplvp serve` is honoured: worker i gets its i-th entry
    picked = worker_plan(2, "cuda", {**env, "CUDA_VISIBLE_DEVICES": "4,6"})
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in picked] == ["4", "6", "4"]
    # an explicit GPU index: the two workers of a CPU machine, told to use that GPU by UPLVP_DEVICE itself
    assert [(w.name, w.device) for w in worker_plan(2, "cuda:1", env)] == [("train", "cuda:1"), ("infer", "cuda:1")]


def test_serve_refuses_cuda_without_a_gpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "UPLVP_REDIS_URL")}
    env.update(UPLVP_DEVICE="cuda", CUDA_VISIBLE_DEVICES="")  # no GPU visible, whatever the machine has
    out = subprocess.run([sys.executable, "-m", "models.cli", "serve", "--port", str(free_port()), "--redis-port",
                          str(free_port()), "--data-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 2 and "UPLVP_DEVICE=cuda, but torch sees no CUDA GPU" in out.stderr


def test_serve_keeps_models_in_an_s3_bucket(tmp_path: Path, voc_zip: bytes, s3_server: Any) -> None:
    """`uplvp serve --artifacts s3://...` against a real SeaweedFS: the trained version's checkpoint is an object
    in the bucket (sha256 in its metadata) and downloads verified; a missing bucket stops it at start."""
    port, redis_port, log = free_port(), free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    prefix = f"serve-{tmp_path.name[-10:]}".lower().replace("_", "-")
    refused = subprocess.run([sys.executable, "-m", "models.cli", "serve", "--port", str(port), "--redis-port",
                              str(redis_port), "--data-dir", str(tmp_path / "refused"), "--artifacts",
                              "s3://no-such-bucket/x"], cwd=ROOT, env={**os.environ, **s3_server.env()},
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "bucket 'no-such-bucket' does not exist" in refused.stderr
    proc = _serve(tmp_path / "data", port, redis_port, log, "--artifacts", f"s3://{s3_server.BUCKET}/{prefix}",
                  env_extra=s3_server.env())
    try:
        _ready(base, proc, log)
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["store"] is True and ready["store_error"] is None
        resp = httpx.post(f"{base}/finetune", files={"dataset": ("d.zip", voc_zip, "application/zip")},
                          data={"name": "ins3", **TINY}, timeout=60)
        job = _wait_job(base, resp.json()["id"], log)
        # the upload went through the bucket (a worker on another host would extract it from there) and left
        # with the job
        jobs_prefix = f"{prefix}/jobs/{job['id']}/"
        assert job["dataset"]["uploads"]["dataset"]["key"] == f"jobs/{job['id']}/dataset.zip"
        deadline = time.monotonic() + 20
        while s3_server.client().list_objects_v2(Bucket=s3_server.BUCKET, Prefix=jobs_prefix).get("KeyCount"):
            assert time.monotonic() < deadline, "the finished job's files are still in the bucket"
            time.sleep(0.5)
        version = httpx.get(f"{base}/models/ins3/versions/{job['result']['version']}").json()
        head = s3_server.client().head_object(Bucket=s3_server.BUCKET, Key=f"{prefix}/models/ins3/v{version['version']}/model.pt")
        assert head["Metadata"]["sha256"] == version["sha256"]
        download = httpx.get(f"{base}/models/ins3/versions/{version['version']}/download", timeout=60)
        assert download.status_code == 200 and download.headers["x-checksum-sha256"] == version["sha256"]
        _stop(proc, (port, redis_port))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
        for pid in _pids(f"redis-server 127.0.0.1:{redis_port}"):
            os.kill(int(pid), signal.SIGKILL)
