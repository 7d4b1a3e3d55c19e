"""Reliability figures against the real stack (`uplvp serve`, default settings, loopback only).

1. The hostile-upload corpus (tests/hostile_corpus.py): each input's answer, and whether anything
   was left in the data dir or beside it.
2. Faults during a fine-tune: SIGKILL of the process that trains (the train worker's pool child),
   SIGKILL of Redis, SIGKILL of the API: how long until the job runs again, whether it finished,
   from which epoch it resumed, and whether any job, model or alias was lost.
Results: bench/results/reliability.{json,md}. The sustained-load figures are in bench/service.py.

    python bench/reliability.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench.common import RESULTS, ROOT  # noqa: E402
from bench.service import free_port, pids_matching  # noqa: E402
from tests.hostile_corpus import build  # noqa: E402
from tests.service_fixtures import TINY, zip_dir  # noqa: E402


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "redis" not in p.parts}


def wait(pred: Any, timeout_s: float, poll_s: float = 0.2) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError
        time.sleep(poll_s)
    return time.monotonic() - t0


def main() -> None:
    from models.data.demo import write_voc_demo

    tmp = Path(tempfile.mkdtemp(prefix="uplvp-bench-rel-"))
    write_voc_demo(tmp / "voc", copies=4)
    data, port, redis_port = tmp / "data", free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "UPLVP_REDIS_URL")}
    env.update(OMP_NUM_THREADS="1", UPLVP_RATE_JOBS_PER_HOUR="0")
    log = tmp / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "models.cli", "serve", "--port", str(port), "--redis-port",
                              str(redis_port), "--data-dir", str(data)], cwd=ROOT, env=env,
                             stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    http = httpx.Client(base_url=base, timeout=120)

    def ready() -> bool:
        try:
            return http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    result: dict[str, Any] = {}
    try:
        wait(ready, 120)
        # 1. hostile uploads
        before, beside = files_under(data), {p.name for p in tmp.iterdir()}
        rows = []
        for name, field, payload, code in build(tmp / "voc"):
            r = http.post("/finetune", files={field: ("upload.zip", payload, "application/zip")},
                          data={"name": "hostile"})
            got = r.json().get("error", {}).get("code")
            rows.append({"input": name, "bytes": len(payload), "status": r.status_code, "code": got,
                         "expected": code, "ok": 400 <= r.status_code < 500 and got == code})
        result["hostile"] = {"inputs": rows, "queued_jobs": http.get("/jobs").json()["total"],
                             "left_in_data_dir": sorted(files_under(data) - before),
                             "left_beside": sorted({p.name for p in tmp.iterdir()} - beside)}
        print(f"hostile: {sum(r['ok'] for r in rows)}/{len(rows)} refused as expected", flush=True)

        # 2. faults during a fine-tune (tiny model, long enough to be interrupted three times)
        zipped = zip_dir(tmp / "voc")
        first = http.post("/finetune", files={"dataset": ("d.zip", zipped, "application/zip")},
                          data={"name": "keeper", **TINY, "epochs": "3"}).json()["id"]
        wait(lambda: http.get(f"/jobs/{first}").json()["state"] == "succeeded", 300, 0.5)
        http.post("/models/keeper/versions/1/promote")
        job_id = http.post("/finetune", files={"dataset": ("d.zip", zipped, "application/zip")},
                           data={"name": "victim", **TINY, "epochs": "400"}).json()["id"]
        faults = []
        targets = (("SIGKILL of the training process", (b"celery", b"-Q train")),  # main + pool child: the child
                   ("SIGKILL of Redis", (f"redis-server 127.0.0.1:{redis_port}".encode(),)),
                   ("SIGKILL of the API", (b"-m app", f"--port {port}".encode())))
        for fault, pattern in targets:
            wait(lambda: (j := http.get(f"/jobs/{job_id}").json())["state"] == "running" and j["epoch"] >= 2, 300)
            epoch_before = http.get(f"/jobs/{job_id}").json()["epoch"]
            victim = pids_matching(*pattern)[-1]  # the pool child (started after its parent) trains
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            time.sleep(1)
            try:
                wait(ready, 180, 0.5)

                def moving() -> bool:
                    j = http.get(f"/jobs/{job_id}").json()
                    return j["state"] == "running" and j["epoch"] > epoch_before and victim not in pids_matching(
                        *pattern)

                wait(moving, 600, 0.5)
                back = time.monotonic() - t0
            except TimeoutError:
                back = None
            j = http.get(f"/jobs/{job_id}").json()
            faults.append({"fault": fault, "epoch_at_kill": epoch_before, "training_again_after_s": back,
                           "state_after": j["state"], "attempts": j["attempts"]})
            print(faults[-1], flush=True)
        http.post(f"/jobs/{job_id}/cancel")
        wait(lambda: http.get(f"/jobs/{job_id}").json()["state"] == "cancelled", 120)
        kept = http.get("/models/keeper").json()
        result["faults"] = {"events": faults, "jobs_total": http.get("/jobs").json()["total"],
                            "keeper_versions": kept["versions"], "keeper_aliases": kept["aliases"],
                            "keeper_download_ok": http.get("/models/keeper/versions/1/download").status_code == 200}
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(timeout=90)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability.json").write_text(json.dumps(result, indent=2))
    h, f = result["hostile"], result["faults"]
    lines = ["# Reliability (`bench/reliability.py`, `uplvp serve` with default settings)", "",
             "| hostile input | size | answer | refused as expected |", "|---|---|---|---|"]
    lines += [f"| {r['input']} | {r['bytes'] / 1024:.0f} KiB | {r['status']} `{r['code']}` | {'yes' if r['ok'] else 'NO'} |"
              for r in h["inputs"]]
    lines += ["", f"Jobs queued by them: {h['queued_jobs']}; files left in the data dir: {len(h['left_in_data_dir'])}; "
              f"beside it: {len(h['left_beside'])}.", "",
              "| fault during a 400-epoch fine-tune | epoch at the kill | training again after | state after | runs |",
              "|---|---|---|---|---|"]
    lines += [f"| {e['fault']} | {e['epoch_at_kill']} | "
              f"{'%.0f s' % e['training_again_after_s'] if e['training_again_after_s'] else 'never'} | "
              f"{e['state_after']} | {e['attempts']} |" for e in f["events"]]
    lines += ["", f"Afterwards: {f['jobs_total']} jobs listed, model `keeper` versions {f['keeper_versions']} with "
              f"aliases {f['keeper_aliases']}, its checkpoint downloads with a matching sha256: "
              f"{f['keeper_download_ok']}."]
    (RESULTS / "reliability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
