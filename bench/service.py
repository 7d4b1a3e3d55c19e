"""Service benchmark: POST /segment through the whole stack vs the bare model call, on 2 CPU cores.

Starts the real stack with `uplvp serve` (its own Redis, one Celery worker with 2 torch threads,
the API) on free loopback ports and a temp data dir; trains a model through POST /finetune (the
default K-Net, 1 epoch on coco128 at short side 384, so its outputs look like a real model's);
then measures
  - the bare model call: models.pipeline.segment on a Predictor in this process (decode, forward,
    RLE + polygons), the work the worker does per request;
  - POST /segment (format=json) with 1 client (sequential), 4 and 16 concurrent clients over
    loopback: p50 / p99 latency and throughput;
  - the API process' RSS before and after the load;
  - job submission: POST /finetune answer time, and time from its 202 until the job is `running`;
  - the first request after a promote: a second version is trained, promoted, and asked at once
    (the worker loads, exports and warms a version when it is trained or promoted), against the
    next ten requests with the same photo.
Images: the first 20 of coco128, cycled. Results: bench/results/service.{json,md}.

    python bench/service.py
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench.common import RESULTS, ROOT, machine, require_data  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def rss_mb(pid: int) -> dict[str, float]:
    """Current and peak resident memory of a process (Linux /proc)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss_mb": out["VmRSS"], "peak_rss_mb": out["VmHWM"]}


def pids_matching(*parts: bytes) -> list[int]:
    """Processes whose command line contains every one of `parts`."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if all(p in cmd for p in parts):
                out.append(int(proc.name))
    return sorted(out)


def api_pid(port: int) -> int:
    """The API process serving `port` (a child of `uplvp serve`)."""
    found = pids_matching(b"-m app", b"--port " + str(port).encode())
    if not found:
        raise RuntimeError(f"no API process on port {port}")
    return found[0]


class RssSampler(threading.Thread):
    """Samples the RSS of some processes every `period_s` until stopped: {name: [(t, MB), ...]}."""

    def __init__(self, pids: dict[str, int], period_s: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.pids, self.period_s = pids, period_s
        self.samples: dict[str, list[tuple[float, float]]] = {n: [] for n in pids}
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            for name, pid in self.pids.items():
                try:
                    self.samples[name].append((time.monotonic() - self.t0, rss_mb(pid)["rss_mb"]))
                except (OSError, KeyError):
                    pass
            self.stop.wait(self.period_s)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, series in self.samples.items():
            mb = [m for _, m in series]
            after_warmup = [m for t, m in series if t >= 10] or mb
            out[name] = {"start_mb": mb[0], "after_10s_mb": after_warmup[0], "end_mb": mb[-1], "max_mb": max(mb),
                         "growth_after_10s_pct": 100 * (mb[-1] / after_warmup[0] - 1)}
        return out


def coco_zip(data: Path) -> bytes:
    """coco128 (annotations + images) as an uploadable zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.write(data / "coco128/annotations/instances_val2017.json", "annotations.json")
        for f in sorted((data / "coco128/val2017").iterdir()):
            zf.write(f, f"images/{f.name}")
    return buf.getvalue()


def wait_state(base: str, job_id: str, states: tuple[str, ...], timeout_s: float, poll_s: float = 0.5) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(f"{base}/jobs/{job_id}", timeout=30).json()
        if job["state"] in states:
            return job
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {job['state']} after {timeout_s} s")
        time.sleep(poll_s)


def load(base: str, images: list[tuple[str, bytes]], clients: int, seconds: float, requests: int | None,
         threshold: float) -> dict[str, Any]:
    """`clients` threads posting one image each to /segment until `seconds` pass (or `requests` are done)."""
    latencies: list[float] = []
    errors: list[str] = []
    instances: list[int] = []
    parts: dict[str, list[float]] = {}  # Server-Timing: check, worker, queue (ms), and what is left of the latency
    lock = threading.Lock()
    counter = iter(range(10**9))
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(timeout=300) as c:
            while time.monotonic() < stop_at:
                i = next(counter)
                if requests is not None and i >= requests:
                    return
                name, data = images[i % len(images)]
                t0 = time.perf_counter()
                r = c.post(f"{base}/segment", files={"images": (name, data, "image/jpeg")},
                           data={"model": "bench", "score_threshold": str(threshold)})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        instances.append(len(r.json()["images"][0]["instances"]))
                        timing = {k: float(v) for k, v in (x.split(";dur=") for x in
                                                           r.headers.get("server-timing", "").split(", ") if x)}
                        timing["http"] = 1000 * dt - sum(timing.values())  # client, HTTP, framework, JSON
                        for k, v in timing.items():
                            parts.setdefault(k, []).append(v)
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server_errors = sum(e.startswith("5") for e in errors)
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "server_errors": server_errors,
            "error_samples": errors[:3],
            "p50_ms": 1000 * pct(latencies, 50), "p99_ms": 1000 * pct(latencies, 99),
            "mean_ms": 1000 * statistics.mean(latencies), "throughput_rps": len(latencies) / wall,
            "instances_per_image": statistics.mean(instances),
            "parts_p50_ms": {k: statistics.median(v) for k, v in parts.items()}}


def bare(artifact: Path, images: list[tuple[str, bytes]], n: int, threshold: float, threads: int,
         onnx: Path | None = None) -> dict[str, Any]:
    """The worker's work per request, in this process: decode + forward + RLE/polygons, on the backend the
    worker uses (the version's ONNX export under ONNX Runtime when there is one, else PyTorch)."""
    from models.pipeline import PredictorCache, segment

    predictor = PredictorCache(1, threads).get(artifact, onnx=(lambda: onnx) if onnx is not None else None)
    for name, data in images[:3]:  # warm-up
        segment(predictor, [(name, data)], threshold, "json")
    latencies = []
    for i in range(n):
        name, data = images[i % len(images)]
        t0 = time.perf_counter()
        segment(predictor, [(name, data)], threshold, "json")
        latencies.append(time.perf_counter() - t0)
    return {"requests": n, "p50_ms": 1000 * pct(latencies, 50), "p99_ms": 1000 * pct(latencies, 99),
            "mean_ms": 1000 * statistics.mean(latencies)}


def first_after_promote(base: str, zipped: bytes, image: tuple[str, bytes], epochs: int,
                        threshold: float) -> dict[str, Any]:
    """Train another version of `bench`, promote it, then send the same photo 11 times at once: the first
    answer's latency against the median of the next ten (issue 16: <= 1.5x)."""
    r = httpx.post(f"{base}/finetune", files={"dataset": ("coco128.zip", zipped, "application/zip")},
                   data={"name": "bench", "epochs": str(epochs), "image_size": "384", "val_fraction": "0"},
                   timeout=300)
    r.raise_for_status()
    job = wait_state(base, r.json()["id"], ("succeeded", "failed", "cancelled"), 3600, poll_s=2)
    if job["state"] != "succeeded":
        raise RuntimeError(f"training the second bench version failed: {job['error']}")
    version = job["result"]["version"]
    t0 = time.perf_counter()
    httpx.post(f"{base}/models/bench/versions/{version}/promote", timeout=60).raise_for_status()
    promote_s = time.perf_counter() - t0
    latencies = []
    with httpx.Client(timeout=300) as c:
        for _ in range(11):
            t0 = time.perf_counter()
            r = c.post(f"{base}/segment", files={"images": (image[0], image[1], "image/jpeg")},
                       data={"model": "bench", "score_threshold": str(threshold)})
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            if r.json()["version"] != version:
                raise RuntimeError(f"v{r.json()['version']} answered after v{version} was promoted")
    warm = statistics.median(latencies[1:])
    return {"version": version, "promote_s": promote_s, "first_ms": 1000 * latencies[0], "warm_p50_ms": 1000 * warm,
            "ratio": latencies[0] / warm, "backend": r.headers.get("X-Backend", "")}


def celery_direct(redis_port: int, data_dir: Path, version: int, images: list[tuple[str, bytes]], n: int,
                  threshold: float) -> dict[str, Any]:
    """The segment task sent straight to the infer queue (no HTTP, no API): the queue's share of the overhead."""
    import base64

    from app.core.config import Settings
    from app.registry import from_settings
    from worker.celery_app import SEGMENT_TASK, make_celery

    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_port}/0", data_dir=data_dir)
    rec = from_settings(settings).get_version("bench", version)  # the artifact key is internal: not in the API
    app = make_celery(settings)
    latencies = []
    for i in range(n):
        name, data = images[i % len(images)]
        t0 = time.perf_counter()
        app.send_task(SEGMENT_TASK, args=[rec["artifact"], rec["sha256"], [[name, base64.b64encode(data).decode()]],
                                          threshold, "json", "bench", version], queue="infer").get(timeout=300)
        latencies.append(time.perf_counter() - t0)
    return {"requests": n, "p50_ms": 1000 * pct(latencies, 50), "p99_ms": 1000 * pct(latencies, 99),
            "mean_ms": 1000 * statistics.mean(latencies)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the worker and of the bare call")
    p.add_argument("--requests", type=int, default=60, help="sequential requests (1 client, and the bare call)")
    p.add_argument("--seconds", type=float, default=40, help="duration of the 4- and 16-client runs")
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--train-epochs", type=int, default=1)
    p.add_argument("--sustain", type=float, default=60, help="seconds of 16-client load with a fine-tune running")
    args = p.parse_args()
    data = require_data()
    images = [(f.name, f.read_bytes()) for f in sorted((data / "coco128/val2017").iterdir())[:20]]
    tmp = Path(tempfile.mkdtemp(prefix="uplvp-bench-service-"))
    port, redis_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "UPLVP_REDIS_URL")}
    env.update(OMP_NUM_THREADS=str(args.threads), UPLVP_WORKER_THREADS=str(args.threads),
               UPLVP_SEGMENT_TIMEOUT_S="300", UPLVP_RATE_SEGMENT_PER_MIN="0")  # measure the stack, not the limiter
    log = open(tmp / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "models.cli", "serve", "--port", str(port), "--redis-port",
                              str(redis_port), "--data-dir", str(tmp / "data")], cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    result: dict[str, Any] = {"settings": vars(args), "machine": machine()}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or serve.poll() is not None:
                raise RuntimeError("the stack did not become ready; see " + str(tmp / "serve.log"))
            time.sleep(0.5)
        pid = api_pid(port)
        result["api_idle"] = rss_mb(pid)

        # A model to serve (and the submission latencies of its job).
        zipped = coco_zip(data)
        t0 = time.perf_counter()
        r = httpx.post(f"{base}/finetune", files={"dataset": ("coco128.zip", zipped, "application/zip")},
                       data={"name": "bench", "epochs": str(args.train_epochs), "image_size": "384",
                             "val_fraction": "0"}, timeout=300)
        post_s = time.perf_counter() - t0
        r.raise_for_status()
        t1 = time.perf_counter()
        wait_state(base, r.json()["id"], ("running", "succeeded", "failed"), 120, poll_s=0.01)
        to_running = time.perf_counter() - t1
        job = wait_state(base, r.json()["id"], ("succeeded", "failed", "cancelled"), 3600, poll_s=2)
        if job["state"] != "succeeded":
            raise RuntimeError(f"training the bench model failed: {job['error']}")
        result["submission"] = {"zip_mb": len(zipped) / 2**20, "post_s": post_s, "to_running_s": to_running}
        print(f"model trained; POST /finetune {post_s:.2f} s, to running {to_running:.3f} s", flush=True)

        # Submission latency on an idle worker, 5 times (each job cancelled once it runs).
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            r = httpx.post(f"{base}/finetune", files={"dataset": ("d.zip", zipped, "application/zip")},
                           data={"name": "bench-submit", "epochs": "1"}, timeout=300)
            t1 = time.perf_counter()
            wait_state(base, r.json()["id"], ("running",), 60, poll_s=0.005)
            runs.append((t1 - t0, time.perf_counter() - t1))
            httpx.post(f"{base}/jobs/{r.json()['id']}/cancel")
            wait_state(base, r.json()["id"], ("cancelled", "failed", "succeeded"), 120, poll_s=0.1)
        result["submission"]["repeated"] = {"post_s_median": statistics.median(a for a, _ in runs),
                                              "to_running_s_median": statistics.median(b for _, b in runs),
                                              "to_running_s_max": max(b for _, b in runs)}

        version = job["result"]["version"]
        artifact = tmp / "data" / "models" / "bench" / f"v{version}" / "model.pt"
        onnx = artifact.with_suffix(".onnx")  # the job's export (UPLVP_INFER_BACKEND onnx, the default)
        result["backend"] = "onnx" if onnx.is_file() else "torch"
        result["bare"] = bare(artifact, images, args.requests, args.threshold, args.threads,
                              onnx if onnx.is_file() else None)
        print("bare", result["bare"], flush=True)
        load(base, images, 1, 60, 5, args.threshold)  # warm the worker's model cache
        result["celery_direct"] = celery_direct(redis_port, tmp / "data", version, images, args.requests,
                                                 args.threshold)
        print("celery direct", result["celery_direct"], flush=True)
        result["load"] = [load(base, images, 1, 600, args.requests, args.threshold)]
        print("1 client", result["load"][0], flush=True)
        for clients in (4, 16):
            result["load"].append(load(base, images, clients, args.seconds, None, args.threshold))
            print(f"{clients} clients", result["load"][-1], flush=True)
        result["api_after"] = rss_mb(pid)
        result["overhead_p50"] = result["load"][0]["p50_ms"] / result["bare"]["p50_ms"] - 1
        result["model"] = {k: job["result"]["metrics"]["training"].get(k) for k in ("kernels", "image_size", "epochs")}
        result["model"]["classes"] = len(json.loads((data / "coco128/annotations/instances_val2017.json")
                                                    .read_text())["categories"])

        result["after_promote"] = first_after_promote(base, zipped, images[0], args.train_epochs, args.threshold)
        print("first request after a promote", result["after_promote"], flush=True)

        # Sustained load while a fine-tune runs (the hardening issue): 16 clients for `sustain` s.
        r = httpx.post(f"{base}/finetune", files={"dataset": ("coco128.zip", zipped, "application/zip")},
                       data={"name": "bench-busy", "epochs": "50", "image_size": "384", "val_fraction": "0"},
                       timeout=300)
        busy = r.json()["id"]
        wait_state(base, busy, ("running",), 120, poll_s=0.1)
        infer = pids_matching(b"worker.celery_app", b"-Q infer")  # solo pool: one process
        train = pids_matching(b"worker.celery_app", b"-Q train")
        sampler = RssSampler({"api": pid, "infer_worker": infer[-1], "train_worker": train[-1]})
        sampler.start()
        sustained = load(base, images, 16, args.sustain, None, args.threshold)
        sampler.stop.set()
        sampler.join()
        still_training = httpx.get(f"{base}/jobs/{busy}").json()
        httpx.post(f"{base}/jobs/{busy}/cancel")
        result["sustained"] = {**sustained, "seconds": args.sustain, "rss": sampler.summary(),
                               "finetune_state_after": still_training["state"],
                               "finetune_epoch_after": still_training["epoch"]}
        print("sustained", result["sustained"], flush=True)
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "service.json").write_text(json.dumps(result, indent=2))
    b, loads, sub, mdl = result["bare"], result["load"], result["submission"], result["model"]
    lines = ["# Service benchmark: POST /segment through the stack (`bench/service.py`)", "",
             f"Machine: {result['machine']['cpu']}, {args.threads} torch threads in the worker; the API, Redis, "
             f"the worker and the clients share the machine's 2 cores; backend: {result['backend']}. Model: K-Net "
             f"with the recipe's defaults (MobileNetV2, {mdl['kernels']} kernels, {mdl['classes']} classes), "
             f"{args.train_epochs} epoch(s) on coco128 at short side {mdl['image_size'][0]}; images: 20 "
             f"coco128 photos; score threshold {args.threshold}; format=json (RLE + polygons).", "",
             "| path | clients | requests | p50 ms | p99 ms | throughput req/s | errors | instances/img |",
             "|---|---|---|---|---|---|---|---|",
             f"| bare model call (in process) | 1 | {b['requests']} | {b['p50_ms']:.0f} | {b['p99_ms']:.0f} "
             f"| {1000 / b['mean_ms']:.2f} | 0 | – |",
             f"| segment task straight to the infer queue (no HTTP) | 1 | {result['celery_direct']['requests']} "
             f"| {result['celery_direct']['p50_ms']:.0f} | {result['celery_direct']['p99_ms']:.0f} "
             f"| {1000 / result['celery_direct']['mean_ms']:.2f} | 0 | – |"]
    for row in loads:
        lines.append(f"| POST /segment | {row['clients']} | {row['requests']} | {row['p50_ms']:.0f} "
                     f"| {row['p99_ms']:.0f} | {row['throughput_rps']:.2f} | {row['errors']} "
                     f"| {row['instances_per_image']:.1f} |")
    lines += ["", f"Stack overhead at p50 with 1 client: **{100 * result['overhead_p50']:.1f} %** (target ≤ 15 %).",
              "Where a POST /segment's time goes at 1 client (medians of the Server-Timing header, ms): "
              + ", ".join(f"{k} {v:.1f}" for k, v in loads[0]["parts_p50_ms"].items())
              + " (check: the API reads and checks the upload; worker: decode, model, encode in the infer worker; "
              "queue: the Celery round trip around it; http: the rest, client and framework included).",
              f"API process RSS: {result['api_idle']['rss_mb']:.0f} MB idle, {result['api_after']['rss_mb']:.0f} MB "
              f"after the load (peak {result['api_after']['peak_rss_mb']:.0f} MB).",
              f"Job submission: POST /finetune with coco128 ({sub['zip_mb']:.0f} MB zip, 128 images validated before "
              f"queueing) answers in {sub['repeated']['post_s_median']:.2f} s (median of 5); 202 → `running` "
              f"{1000 * sub['repeated']['to_running_s_median']:.0f} ms median, "
              f"{1000 * sub['repeated']['to_running_s_max']:.0f} ms max, on an idle worker."]
    ap = result["after_promote"]
    lines += ["", f"First request after a promote: v{ap['version']} trained, promoted (answer {1000 * ap['promote_s']:.0f} ms) "
              f"and asked at once: {ap['first_ms']:.0f} ms, against {ap['warm_p50_ms']:.0f} ms for the next ten "
              f"(the same photo): **{ap['ratio']:.2f}x** (target ≤ 1.5x)."]
    su = result["sustained"]
    lines += ["", f"Sustained load: 16 clients for {su['seconds']:.0f} s while a fine-tune trains on the same 2 cores: "
              f"{su['requests']} answers, {su['errors']} errors ({su['server_errors']} 5xx), p50 {su['p50_ms']:.0f} ms, p99 {su['p99_ms']:.0f} ms, "
              f"{su['throughput_rps']:.2f} req/s; the fine-tune was still `{su['finetune_state_after']}` "
              f"(epoch {su['finetune_epoch_after']}).", "",
              "| process | RSS at start MB | at 10 s | at end | max | growth after 10 s |", "|---|---|---|---|---|---|"]
    for name, r in su["rss"].items():
        lines.append(f"| {name} | {r['start_mb']:.0f} | {r['after_10s_mb']:.0f} | {r['end_mb']:.0f} | "
                     f"{r['max_mb']:.0f} | {r['growth_after_10s_pct']:+.1f} % |")
    (RESULTS / "service.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
