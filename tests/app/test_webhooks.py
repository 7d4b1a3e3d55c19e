"""Webhooks (app/webhooks.py): the SSRF rules, the signature, the Redis outbox's retries and its recovery of
an event whose process was killed mid-delivery, and a real receiver on loopback getting the signed POST of a
finished, a failed and a cancelled job."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    EVENT_KEY,
    OUTBOX,
    SIGNATURE_HEADER,
    Dispatcher,
    WebhookRefused,
    check_url,
    sign,
    verify,
)
from tests.app.api.routes.test_finetune import assert_error
from tests.service_fixtures import TINY, WEBHOOK_SECRET, wait_job


class Receiver:
    """A real HTTP server on loopback that records every POST and answers with the next scripted status."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.statuses: list[int] = []  # answered in order; 200 once they run out; 0: hold the call 5 s, then 200
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.received.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                if status == 0:
                    time.sleep(5)
                    status = 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.received if r["path"] == path]


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def test_signature_is_hmac_sha256_of_the_body() -> None:
    import hashlib
    import hmac

    body = b'{"event":"job.succeeded"}'
    assert sign(body, "k" * 16) == "sha256=" + hmac.new(b"k" * 16, body, hashlib.sha256).hexdigest()
    assert verify(body, "k" * 16, sign(body, "k" * 16)) and not verify(body + b" ", "k" * 16, sign(body, "k" * 16))


@pytest.mark.parametrize("url, says", [
    ("ftp://example.com/hook", "http:// or https://"),
    ("http:///nohost", "http:// or https://"),
    ("http://127.0.0.1:8000/hook", "127.0.0.1"),
    ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
    ("http://10.1.2.3/hook", "private"),
    ("http://[::1]/hook", "::1"),
    ("http://localhost/hook", "loopback"),
    ("http://user:pw@93.184.216.34/hook", "user name or password"),
])
def test_ssrf_rules(url: str, says: str) -> None:
    with pytest.raises(WebhookRefused, match=None) as e:
        check_url(url, allow_private=False)
    assert says in str(e.value)


def test_public_and_opted_in_private_addresses_pass() -> None:
    assert check_url("https://93.184.216.34/hook?x=1", allow_private=False) == "https://93.184.216.34/hook?x=1"
    assert check_url("http://127.0.0.1:9/hook", allow_private=True) == "http://127.0.0.1:9/hook"


@pytest.fixture()
def outbox(settings: Any, tmp_path: Any) -> Iterator[Any]:
    """A registry on a Redis database of its own (the outbox and the jobs of these tests only)."""
    from app.registry import Registry, connect

    r = connect(settings.redis_url.rsplit("/", 1)[0] + "/8")
    r.flushdb()
    yield Registry(r, tmp_path)
    r.flushdb()


def _job(registry: Any, job_id: str) -> dict[str, Any]:
    registry.create_job(job_id, "hooks", {}, {}, None, webhook_url="http://127.0.0.1:9/x")
    registry.start_job(job_id)
    registry.finish_job(job_id, "succeeded")
    return registry.get_job(job_id)


def _drain(d: Dispatcher, delivery_id: str, timeout_s: float = 10) -> None:
    """Run the dispatcher until the event has left the outbox (delivered or given up)."""
    deadline = time.monotonic() + timeout_s
    while d.registry.r.exists(EVENT_KEY + delivery_id) and time.monotonic() < deadline:
        d.run_once()
        time.sleep(0.005)
    assert not d.registry.r.exists(EVENT_KEY + delivery_id) and d.registry.r.zcard(OUTBOX) == 0


def test_delivery_retries_transient_failures_only(outbox: Any, receiver: Receiver) -> None:
    d = Dispatcher(outbox, WEBHOOK_SECRET, attempts=4, backoff_s=0.01, allow_private=True)
    job = _job(outbox, "j1")
    receiver.statuses = [503, 500]
    _drain(d, d.enqueue(f"{receiver.url}/a", job))
    assert outbox.get_job("j1")["webhook"] | {"finished_at": None} == {
        "event": "job.succeeded", "delivered": True, "attempts": 3, "status": 200, "error": None, "finished_at": None}
    got = receiver.bodies("/a")
    assert len(got) == 3 and len({r["headers"][DELIVERY_HEADER] for r in got}) == 1  # one event, one delivery id
    assert len({r["body"] for r in got}) == 1  # the body was fixed when the job ended
    for r in got:
        assert verify(r["body"], WEBHOOK_SECRET, r["headers"][SIGNATURE_HEADER])
        assert r["headers"][EVENT_HEADER] == "job.succeeded" and json.loads(r["body"])["job"]["id"] == "j1"
    receiver.statuses = [404]
    _drain(d, d.enqueue(f"{receiver.url}/b", job))
    hook = outbox.get_job("j1")["webhook"]
    assert (hook["delivered"], hook["attempts"], hook["status"]) == (False, 1, 404) and "404" in hook["error"]
    receiver.statuses = [500] * 10
    _drain(d, d.enqueue(f"{receiver.url}/c", job))
    hook = outbox.get_job("j1")["webhook"]
    assert (hook["delivered"], hook["attempts"], hook["status"]) == (False, 4, 500) and len(receiver.bodies("/c")) == 4
    guarded = Dispatcher(outbox, WEBHOOK_SECRET, attempts=4, backoff_s=0.01, allow_private=False)
    _drain(guarded, guarded.enqueue("http://127.0.0.1:9/closed", job))
    hook = outbox.get_job("j1")["webhook"]
    assert (hook["delivered"], hook["attempts"]) == (False, 1) and "127.0.0.1" in hook["error"]  # re-checked: refused


def test_an_event_whose_process_is_killed_mid_delivery_is_sent_again(outbox: Any, receiver: Receiver,
                                                                       settings: Any, tmp_path: Any) -> None:
    """The outbox's lease: a dispatcher SIGKILLed while its POST is in flight loses nothing; another
    process delivers the event (same delivery id, same body) once the claim's lease has run out."""
    d = Dispatcher(outbox, WEBHOOK_SECRET, attempts=4, backoff_s=0.01, allow_private=True, lease_s=1.0)
    delivery_id = d.enqueue(f"{receiver.url}/k", _job(outbox, "killed"))
    receiver.statuses = [0]  # the first call hangs: its sender is killed meanwhile
    url = settings.redis_url.rsplit("/", 1)[0] + "/8"
    code = ("from app.registry import Registry, connect; from app.webhooks import Dispatcher; "
            f"Dispatcher(Registry(connect({url!r}), {str(tmp_path)!r}), {WEBHOOK_SECRET!r}, attempts=4, "
            "backoff_s=0.01, allow_private=True, lease_s=1.0).run_once()")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        _events(receiver, "/k", 1, timeout_s=60)
    finally:
        proc.kill()
        proc.wait()
    assert len(receiver.bodies("/k")) == 1 and proc.returncode == -9
    assert d.run_once() == 0  # still claimed: nobody sends it twice at once
    time.sleep(1.1)
    _drain(d, delivery_id)
    got = receiver.bodies("/k")
    assert len(got) == 2 and got[0]["body"] == got[1]["body"]
    assert got[0]["headers"][DELIVERY_HEADER] == got[1]["headers"][DELIVERY_HEADER] == delivery_id
    assert outbox.get_job("killed")["webhook"]["delivered"]


def test_a_deleted_jobs_event_does_not_bring_its_record_back(outbox: Any, receiver: Receiver) -> None:
    d = Dispatcher(outbox, WEBHOOK_SECRET, attempts=2, backoff_s=0.01, allow_private=True)
    delivery_id = d.enqueue(f"{receiver.url}/gone", _job(outbox, "gone"))
    outbox.r.delete("uplvp:job:gone")
    _drain(d, delivery_id)
    assert len(receiver.bodies("/gone")) == 1 and not outbox.r.exists("uplvp:job:gone")


def test_every_way_a_job_ends_calls_the_hook(settings: Any, tmp_path: Any) -> None:
    """finish_job, the cancel of a queued job and the orphan sweep all go through Registry.on_finish."""
    from app.registry import Registry, connect

    seen: list[tuple[str, str]] = []
    r = connect(settings.redis_url.rsplit("/", 1)[0] + "/7")  # a database of its own: the sweep sees only these
    r.flushdb()
    reg = Registry(r, tmp_path, on_finish=lambda _, job: seen.append((job["id"], job["state"])))
    for job_id in ("hook-a", "hook-b", "hook-c"):
        reg.create_job(job_id, "hooks", {}, {}, None, webhook_url="http://127.0.0.1:9/x")
    assert reg.request_cancel("hook-a") == "cancelled_now"
    reg.start_job("hook-b")
    reg.finish_job("hook-b", "failed", error={"code": "x", "message": "y"})
    reg.start_job("hook-c")  # running, attempts 1, and no lock: its worker is gone
    assert ("hook-c", "finetune", "failed") in reg.requeue_orphans(max_attempts=1)
    assert seen == [("hook-a", "cancelled"), ("hook-b", "failed"), ("hook-c", "failed")]
    assert reg.get_job("hook-a")["webhook_url"] == "http://127.0.0.1:9/x"


def _events(receiver: Receiver, path: str, n: int, timeout_s: float = 30) -> list[dict[str, Any]]:
    import time

    deadline = time.monotonic() + timeout_s
    while len(receiver.bodies(path)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return receiver.bodies(path)


def test_finished_and_failed_jobs_post_signed_webhooks(client: Any, voc_zip: bytes, receiver: Receiver) -> None:
    receiver.statuses = [503]  # the first delivery fails: the worker retries
    resp = client.post("/finetune", files={"dataset": ("d.zip", voc_zip, "application/zip")},
                       data={"name": "hooked", **TINY, "webhook_url": f"{receiver.url}/done"})
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["id"])
    assert job["state"] == "succeeded" and job["webhook_url"] == f"{receiver.url}/done"
    got = _events(receiver, "/done", 2)
    assert len(got) == 2 and got[0]["body"] == got[1]["body"]
    body = json.loads(got[1]["body"])
    assert verify(got[1]["body"], WEBHOOK_SECRET, got[1]["headers"][SIGNATURE_HEADER])
    assert body["event"] == "job.succeeded" and body["job"]["id"] == job["id"]
    assert body["job"]["result"]["version"] == job["result"]["version"] and body["job"]["history"]
    record = wait_job(client, job["id"], until=lambda j: j.get("webhook") is not None)
    assert record["webhook"]["delivered"] and record["webhook"]["attempts"] == 2

    # kernels below the most instances in one image (19): the job fails in the worker
    resp = client.post("/finetune", files={"dataset": ("d.zip", voc_zip, "application/zip")},
                       data={"name": "hooked", **TINY, "kernels": "5", "webhook_url": f"{receiver.url}/failed"})
    job = wait_job(client, resp.json()["id"])
    assert job["state"] == "failed"
    got = _events(receiver, "/failed", 1)
    body = json.loads(got[0]["body"])
    assert body["event"] == "job.failed" and body["job"]["error"]["message"] == job["error"]["message"]


def test_bad_webhook_urls_are_a_400(settings: Any, client: Any, voc_zip: bytes) -> None:
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from app.main import create_app

    files = {"dataset": ("d.zip", voc_zip, "application/zip")}
    with TestClient(create_app(settings.model_copy(update={"webhook_allow_private": False}))) as guarded:
        for url in ("http://127.0.0.1:8000/hook", "http://169.254.169.254/latest"):
            assert_error(guarded.post("/finetune", files=files, data={"name": "w", **TINY, "webhook_url": url}),
                         400, "webhook_url_refused", url.split("/")[2].split(":")[0])
    assert_error(client.post("/finetune", files=files, data={"name": "w", **TINY, "webhook_url": "file:///etc"}),
                 400, "webhook_url_refused", "http")
    with TestClient(create_app(settings.model_copy(update={"webhook_secret": SecretStr("")}))) as unsigned:
        assert_error(unsigned.post("/finetune", files=files, data={"name": "w", **TINY,
                                                                   "webhook_url": "http://127.0.0.1:9/x"}),
                     400, "webhooks_disabled", "UPLVP_WEBHOOK_SECRET")
    photo = ("a.jpg", b"\xff\xd8", "image/jpeg")
    assert_error(client.post("/segment", files={"images": photo}, data={"model": "ghost",
                                                                        "webhook_url": "http://127.0.0.1:9/x"}),
                 400, "webhook_needs_async", "async=true")
