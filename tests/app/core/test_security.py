"""API keys (401/403, constant-time match, read-only keys), rate limits and the job cap (429 + Retry-After),
and the refusal to listen off loopback without keys."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.core.security import key_id, parse_api_keys
from tests.app.api.routes.test_finetune import assert_error
from tests.service_fixtures import ROOT

WRITE, READ = "w" * 20 + "-writer", "r" * 20 + "-reader"


def test_parse_api_keys() -> None:
    assert parse_api_keys(f" {WRITE} ,{READ}:read,") == [(WRITE, True), (READ, False)]
    assert parse_api_keys("") == []
    with pytest.raises(ValueError, match="too short"):
        parse_api_keys("short")
    with pytest.raises(ValueError, match="unknown role") as err:
        parse_api_keys(f"{WRITE}:admin")
    assert WRITE not in str(err.value)  # a key never appears in an error message


@pytest.fixture()
def secured(settings: Any) -> Iterator[TestClient]:
    from app.main import create_app

    s = settings.model_copy(update={"api_keys": SecretStr(f"{WRITE},{READ}:read"), "rate_segment_per_min": 3,
                                    "max_active_jobs_per_key": 1, "rate_jobs_per_hour": 60})
    with TestClient(create_app(s)) as c:
        yield c


def test_keys_are_required_and_checked(secured: TestClient) -> None:
    resp = secured.get("/models")
    assert_error(resp, 401, "missing_api_key", "Authorization: Bearer")
    assert resp.headers["www-authenticate"] == "Bearer"
    assert_error(secured.get("/models", headers={"Authorization": "Bearer " + WRITE[:-1] + "x"}), 401,
                 "invalid_api_key", "not valid")
    assert secured.get("/models", headers={"Authorization": f"Bearer {WRITE}"}).status_code == 200
    assert secured.get("/jobs", headers={"X-API-Key": READ}).status_code == 200
    assert secured.get("/healthz").status_code == 200 and secured.get("/openapi.json").status_code == 200


def test_read_only_keys_read_and_segment_but_do_not_change_anything(secured: TestClient) -> None:
    ro = {"X-API-Key": READ}
    files = {"dataset": ("d.zip", b"not a zip", "application/zip")}
    assert_error(secured.post("/finetune", files=files, data={"name": "x"}, headers=ro), 403, "read_only_key",
                 "read-only")
    assert_error(secured.post("/pretrain", files={"images_zip": ("i.zip", b"x", "application/zip")},
                              data={"name": "x", "vocabulary": "cat"}, headers=ro), 403, "read_only_key", "read-only")
    assert_error(secured.post("/jobs/0123/cancel", headers=ro), 403, "read_only_key", "cancel")
    assert_error(secured.post("/models/m/versions/1/promote", headers=ro), 403, "read_only_key", "promote")
    assert_error(secured.delete("/models/m/versions/1", headers=ro), 403, "read_only_key", "delete")
    # ... while segmenting gets past authentication (the model does not exist: 404).
    photo = ("a.jpg", b"\xff\xd8", "image/jpeg")
    assert_error(secured.post("/segment", files={"images": photo}, data={"model": "ghost-ro"}, headers=ro), 404,
                 "unknown_model", "ghost-ro")
    # A write key gets past authorization to validation.
    assert_error(secured.post("/finetune", files=files, data={"name": "x"}, headers={"X-API-Key": WRITE}), 400,
                 "not_a_zip", "not a zip")


def test_segment_rate_limit_answers_429_with_retry_after(secured: TestClient, registry: Any) -> None:
    for k in registry.r.scan_iter(f"uplvp:rate:segment:{key_id(READ)}:*"):
        registry.r.delete(k)  # earlier tests' requests in this minute
    h = {"X-API-Key": READ}
    photo = ("a.jpg", b"\xff\xd8", "image/jpeg")
    # Limit 3 per minute: 7 requests overflow it even when a minute boundary falls among them.
    codes = [secured.post("/segment", files={"images": photo}, data={"model": "ghost"}, headers=h) for _ in range(7)]
    assert {r.status_code for r in codes} == {404, 429} and codes[0].status_code == 404
    limited = next(r for r in codes if r.status_code == 429)
    assert_error(limited, 429, "rate_limited", "per 60 s")
    assert 1 <= int(limited.headers["retry-after"]) <= 61


def test_job_submission_rate_limit(settings: Any, registry: Any) -> None:
    from app.main import create_app

    key = "j" * 20 + "-submitter"
    for k in registry.r.scan_iter(f"uplvp:rate:job:{key_id(key)}:*"):
        registry.r.delete(k)
    s = settings.model_copy(update={"api_keys": SecretStr(key), "rate_jobs_per_hour": 2})
    with TestClient(create_app(s)) as c:
        codes = [c.post("/finetune", files={"dataset": ("d.zip", b"x", "application/zip")}, data={"name": "x"},
                        headers={"X-API-Key": key}) for _ in range(3)]
    assert [r.status_code for r in codes[:2]] == [400, 400]  # counted, then refused as not a zip
    assert_error(codes[2], 429, "rate_limited", "per 3600 s")
    assert int(codes[2].headers["retry-after"]) >= 1


def test_active_job_cap_per_key(secured: TestClient, registry: Any) -> None:
    job_id = registry.new_job_id()
    registry.create_job(job_id, "capped", {"epochs": 1}, {}, None, owner=key_id(WRITE))
    try:
        resp = secured.post("/finetune", files={"dataset": ("d.zip", b"x", "application/zip")}, data={"name": "x"},
                            headers={"X-API-Key": WRITE})
        assert_error(resp, 429, "too_many_jobs", "cap is 1")
        assert resp.headers["retry-after"]
    finally:
        registry.finish_job(job_id, "cancelled")


def test_refuses_to_listen_off_loopback_without_keys() -> None:
    env = {k: v for k, v in os.environ.items() if k != "UPLVP_API_KEYS"}
    out = subprocess.run([sys.executable, "-m", "app", "--host", "0.0.0.0", "--port", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "UPLVP_API_KEYS" in out.stderr
