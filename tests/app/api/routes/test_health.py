"""Liveness, readiness and the OpenAPI docs."""

from __future__ import annotations

import time
from typing import Any


def test_healthz_readyz(client: Any) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] is True and ready.json()["workers"]
    # each worker's device, from its heartbeat (the suite's worker runs on the CPU: UPLVP_DEVICE auto, no GPU)
    assert set(ready.json()["devices"]) == set(ready.json()["workers"])
    assert set(ready.json()["devices"].values()) == {"cpu"}


def test_readyz_without_workers_is_503(client: Any, registry: Any) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    lonely = client.app.state.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(lonely)) as c:
        t0 = time.monotonic()
        resp = c.get("/readyz")
        took = time.monotonic() - t0
    # at once, not after the ~20 s of retries the registry's client spends riding out a Redis restart
    assert took < 5, took
    assert resp.status_code == 503 and resp.json() == {"status": "not_ready", "redis": False, "workers": [],
                                                 "devices": {}, "store": True, "store_error": None}


def test_reachable_pings_once(registry: Any, tmp_path: Any) -> None:
    """Registry.reachable: True on the suite's Redis; False on a port where nothing listens, after one
    refused connection (the registry's client itself would retry 25 times)."""
    import redis

    from app.registry import Registry, connect

    attempts = []

    class Counted(redis.Connection):
        # one call per socket attempt: connect() itself runs once and retries _connect inside (26 calls on
        # the service's client, ~20 s)
        def _connect(self) -> Any:
            attempts.append(1)
            return super()._connect()

    assert registry.reachable()
    client = connect("redis://127.0.0.1:1/0")  # the service's own client, retries and all
    client.connection_pool.connection_class = Counted
    assert not Registry(client, tmp_path).reachable()
    assert attempts == [1]


def test_docs_and_openapi(client: Any) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/finetune", "/jobs", "/jobs/{job_id}/cancel", "/segment", "/models/{name}/versions/{version}/promote",
            "/healthz", "/readyz"} <= set(spec["paths"])
    assert "202" in spec["paths"]["/finetune"]["post"]["responses"]
    assert spec["components"]["schemas"]["Job"]["properties"]["state"]["enum"] == [
        "queued", "running", "succeeded", "failed", "cancelled"]


def test_unknown_route_uses_the_error_shape(client: Any) -> None:
    body = client.get("/nowhere").json()
    assert body["error"]["code"] == "not_found"


def test_readyz_names_a_store_that_does_not_answer(client: Any, monkeypatch: Any) -> None:
    """A store that does not answer (no endpoint here; a missing bucket or refused credential alike, see
    tests/app/test_storage.py) makes the service not ready, saying why."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.service_fixtures import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")

    broken = client.app.state.settings.model_copy(update={"artifacts": "s3://no-such-bucket/x",
                                                          "s3_endpoint_url": f"http://127.0.0.1:{free_port()}"})
    with TestClient(create_app(broken)) as c:
        resp = c.get("/readyz")
    assert resp.status_code == 503 and resp.json()["store"] is False
    assert "could not be reached" in resp.json()["store_error"] and resp.json()["redis"] is True
