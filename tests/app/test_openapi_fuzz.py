"""schemathesis (its CLI, `st run`) against the service's own OpenAPI spec, served by a real API
process on loopback with the session's real Redis and worker behind it: no 5xx, and no status
code, content type, header or body that contradicts the schema. Bounded: 20 cases per operation.

One check is left out: `positive_data_acceptance` wants every schema-valid request accepted, but
an upload's content (is it a zip? a COCO file? an image?) is beyond what a schema can say, so
schema-valid random bytes rightly get a 400 that names the problem."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.service_fixtures import ROOT, free_port


def test_schemathesis_finds_nothing(service_env: dict[str, str], celery_worker: Path, tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, **service_env, UPLVP_RATE_JOBS_PER_HOUR="0")  # let the fuzzer reach the logic
    api = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and api.poll() is None, "the API did not start"
            time.sleep(0.3)
        st = Path(sys.executable).with_name("st")
        out = subprocess.run([str(st), "run", f"http://127.0.0.1:{port}/openapi.json", "--checks", "all",
                              "--exclude-checks", "positive_data_acceptance",
                              "--max-examples", "20", "--generation-deterministic", "--request-timeout", "60",
                              "--no-color"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[:8000] + out.stderr[-2000:]
    finally:
        api.terminate()
        api.wait(timeout=30)
