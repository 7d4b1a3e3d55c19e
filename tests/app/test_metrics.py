"""GET /metrics (app/metrics.py): scraped from the live stack and parsed with prometheus_client's own parser."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.app.api.routes.test_finetune import assert_error


def _scrape(client: Any, **kw: Any) -> dict[str, list[Any]]:
    resp = client.get("/metrics", **kw)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(resp.text)}


def _value(samples: list[Any], name: str, **labels: str) -> float | None:
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_metrics_cover_requests_jobs_queues_segmentation_and_models(client: Any, trained: dict[str, Any],
                                                                    voc_dir: Any) -> None:
    assert client.get("/jobs/no-such-job").status_code == 404
    photo = (voc_dir / "images" / "voc_0.jpg").read_bytes()
    seg = client.post("/segment", files={"images": ("p.jpg", photo, "image/jpeg")}, data={"model": "voc"})
    assert seg.status_code == 200, seg.text
    m = _scrape(client)

    requests = m["uplvp_http_requests"]
    # the route's template, never the id: one series for every job id
    assert _value(requests, "uplvp_http_requests_total", method="GET", route="/jobs/{job_id}", status="404") >= 1
    assert _value(requests, "uplvp_http_requests_total", method="POST", route="/segment", status="200") >= 1
    assert not any("no-such-job" in str(s.labels) for s in requests)
    latency = m["uplvp_http_request_duration_seconds"]
    assert _value(latency, "uplvp_http_request_duration_seconds_count", method="POST", route="/segment",
                  status="200") >= 1

    assert _value(m["uplvp_jobs"], "uplvp_jobs", kind="finetune", state="succeeded") >= 1
    assert {s.labels["queue"] for s in m["uplvp_queue_depth"]} == {"train", "infer"}
    assert all(s.value >= 0 for s in m["uplvp_queue_depth"])

    seg_latency = m["uplvp_segment_latency_seconds"]
    count = _value(seg_latency, "uplvp_segment_latency_seconds_count")
    assert count is not None and count >= 1
    assert _value(seg_latency, "uplvp_segment_latency_seconds_bucket", le="+Inf") == count
    assert _value(seg_latency, "uplvp_segment_latency_seconds_sum") > 0

    # the worker's heartbeat (every second in the tests) reports the model it now holds
    deadline = time.monotonic() + 15
    while True:
        loaded = [s.value for s in _scrape(client)["uplvp_models_loaded"]]
        if any(v >= 1 for v in loaded) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert any(v >= 1 for v in loaded), loaded


def test_metrics_need_a_key_when_keys_are_set(settings: Any) -> None:
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from app.main import create_app

    reader = "r" * 20 + "-metrics"
    with TestClient(create_app(settings.model_copy(update={"api_keys": SecretStr(f"{reader}:read")}))) as c:
        assert_error(c.get("/metrics"), 401, "missing_api_key", "Authorization")
        assert "uplvp_jobs" in _scrape(c, headers={"X-API-Key": reader})
