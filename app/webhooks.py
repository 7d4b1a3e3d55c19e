"""Job webhooks: a signed POST to the job's `webhook_url` when it succeeds, fails or is cancelled.

The body is ``{"event": "job.succeeded" | "job.failed" | "job.cancelled", "job": <GET /jobs/{id}'s
record>}``, signed with HMAC-SHA256 under the server's ``UPLVP_WEBHOOK_SECRET``: the header
``X-Uplvp-Signature: sha256=<hex digest of the raw body>`` (check it with `verify`, or any HMAC
library, before trusting the body). ``X-Uplvp-Event`` names the event and ``X-Uplvp-Delivery`` is
one id per event (the same on every retry, so a receiver can drop repeats).

Deliveries go through an outbox in Redis, so none is lost with the process that ended the job: the
event (its body fixed then, so every retry sends the same bytes) is stored and scheduled when the
job ends, and every API and worker process runs a `Dispatcher` thread that claims due events with a
lease (a visibility timeout: a claimed event becomes due again if its claimant dies before it is
done), POSTs them and reschedules transient failures. ``UPLVP_WEBHOOK_ATTEMPTS`` attempts with
exponential back-off from ``UPLVP_WEBHOOK_BACKOFF_S``, retried on network errors, timeouts, 408, 429
and 5xx only. Delivery is at least once (a process killed between the receiver's 2xx and the
outbox's update sends the event again, with the same delivery id). A hook that fails never fails
the job; the outcome is kept on the job as ``webhook``.

SSRF: only http(s) URLs, and every address the host resolves to must be public, both when the job
is submitted and again before each delivery (DNS can change in between); redirects are not
followed. ``UPLVP_WEBHOOK_ALLOW_PRIVATE=1`` lifts the address rule (a receiver on the same
network, and the tests' server on loopback).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from app.registry import P

if TYPE_CHECKING:
    from app.core.config import Settings
    from app.registry import Registry

log = logging.getLogger("uplvp.webhooks")

SIGNATURE_HEADER = "X-Uplvp-Signature"
EVENT_HEADER = "X-Uplvp-Event"
DELIVERY_HEADER = "X-Uplvp-Delivery"
RETRY_STATUS = {408, 429}  # and every 5xx
TIMEOUT_S = 10.0
MAX_URL_LENGTH = 2048
OUTBOX = f"{P}webhooks:due"  # sorted set: delivery id -> when it is due (epoch seconds)
EVENT_KEY = f"{P}webhook:"  # + delivery id: a hash with the event (url, body, job id, attempts so far, ...)
LEASE_S = TIMEOUT_S + 20.0  # a claimed event is due again after this long unless it was done first
POLL_S = 1.0  # how often an idle dispatcher looks for due events (others left behind, retries)

# Claim up to ARGV[3] events due by ARGV[1]: each one's due time moves to ARGV[2] (now + lease) in the
# same step, so two dispatchers never take the same event and a dead claimant's events come back.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


class WebhookRefused(ValueError):
    """A webhook URL the service will not call (the message says why and what to do)."""


def check_url(url: str, allow_private: bool) -> str:
    """`url` if it may be called, else WebhookRefused: http(s), a host, public addresses only (unless allowed)."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"webhook_url is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise WebhookRefused(f"webhook_url {url!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"webhook_url must be an http:// or https:// URL with a host, got {url!r}")
    if parts.username or parts.password:
        raise WebhookRefused("webhook_url must not hold a user name or password; verify the signature header instead")
    if allow_private:
        return url
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookRefused(f"webhook_url's host {parts.hostname!r} does not resolve ({exc})") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if not addr.is_global or addr.is_multicast:
            raise WebhookRefused(f"webhook_url's host {parts.hostname!r} is {addr}, a private, loopback, link-local "
                                 "or reserved address; the service only calls public addresses (an operator can allow "
                                 "private ones with UPLVP_WEBHOOK_ALLOW_PRIVATE=1)")
    return url


def sign(body: bytes, secret: str) -> str:
    """The signature header's value: ``sha256=`` + the hex HMAC-SHA256 of `body` under `secret`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str) -> bool:
    """Whether `header` (X-Uplvp-Signature) signs `body` under `secret` (constant-time comparison)."""
    return hmac.compare_digest(sign(body, secret), header)


@dataclass
class Delivery:
    """What delivering one event did (kept on the job as `webhook`)."""

    event: str
    delivered: bool = False
    attempts: int = 0
    status: int | None = None  # the last HTTP status received
    error: str | None = None  # why the last attempt failed
    finished_at: float | None = None


def post_once(url: str, body: bytes, headers: dict[str, str], allow_private: bool) -> tuple[int | None, str | None, bool]:
    """One signed POST: (HTTP status or None, error or None, whether trying again may help); never raises."""
    try:
        check_url(url, allow_private)  # again: the name may resolve elsewhere now
        with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False, trust_env=False) as client:
            resp = client.post(url, content=body, headers=headers)
    except WebhookRefused as exc:
        return None, str(exc), False
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}", True
    if 200 <= resp.status_code < 300:
        return resp.status_code, None, False
    # any other 4xx: the receiver refused this event, and sending it again will not help
    return resp.status_code, f"the receiver answered {resp.status_code}", \
        resp.status_code in RETRY_STATUS or resp.status_code >= 500


@dataclass
class Dispatcher:
    """Delivers the outbox's due events; one per process, any number per deployment (claims are atomic).

    `enqueue` stores an event; `run_once` delivers what is due now (tests and the loop); `start` runs
    the loop in a daemon thread, woken at once by this process's own `enqueue` and every POLL_S for
    the rest (retries, and events whose claimant died: due again LEASE_S after their claim).
    """

    registry: Registry
    secret: str
    attempts: int
    backoff_s: float
    allow_private: bool
    lease_s: float = LEASE_S
    poll_s: float = POLL_S
    _wake: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._claim = self.registry.r.register_script(_CLAIM)

    def enqueue(self, url: str, job: dict[str, Any]) -> str:
        """Store the event of a job that just ended (its record, history included) and make it due now."""
        event = f"job.{job['state']}"
        body = json.dumps({"event": event, "job": job}, separators=(",", ":"), default=str)
        delivery_id = uuid.uuid4().hex
        pipe = self.registry.r.pipeline(transaction=True)
        pipe.hset(EVENT_KEY + delivery_id, mapping={"url": url, "event": event, "body": body, "job_id": job["id"],
                                                    "attempts": 0})
        pipe.zadd(OUTBOX, {delivery_id: time.time()})
        pipe.execute()
        self._wake.set()
        return delivery_id

    def run_once(self, limit: int = 16) -> int:
        """Claim and attempt up to `limit` due events; returns how many were attempted."""
        now = time.time()
        ids = self._claim(keys=[OUTBOX], args=[now, now + self.lease_s, limit])
        for delivery_id in ids:
            try:
                self._attempt(delivery_id)
            except Exception:  # a hook never takes a process down; the lease brings the event back  # noqa: BLE001
                log.exception("webhook delivery %s failed", delivery_id)
        return len(ids)

    def _attempt(self, delivery_id: str) -> None:
        r = self.registry.r
        ev = r.hgetall(EVENT_KEY + delivery_id)
        if not ev:  # done by another claimant in the meantime
            r.zrem(OUTBOX, delivery_id)
            return
        body = ev["body"].encode()
        headers = {"Content-Type": "application/json", "User-Agent": "uplvp-webhook/1", EVENT_HEADER: ev["event"],
                   DELIVERY_HEADER: delivery_id, SIGNATURE_HEADER: sign(body, self.secret)}
        status, error, retry = post_once(ev["url"], body, headers, self.allow_private)
        attempts = int(ev["attempts"]) + 1
        if retry and attempts < self.attempts:
            pipe = r.pipeline(transaction=True)
            pipe.hset(EVENT_KEY + delivery_id, mapping={"attempts": attempts, "status": status or "", "error": error})
            pipe.zadd(OUTBOX, {delivery_id: time.time() + self.backoff_s * 2 ** (attempts - 1)})
            pipe.execute()
            self._wake.set()  # the loop waits at most until this retry is due
            return
        outcome = Delivery(event=ev["event"], delivered=error is None, attempts=attempts, status=status, error=error,
                           finished_at=time.time())
        pipe = r.pipeline(transaction=True)
        pipe.zrem(OUTBOX, delivery_id)
        pipe.delete(EVENT_KEY + delivery_id)
        pipe.execute()
        if r.exists(f"{P}job:{ev['job_id']}"):  # not a job deleted since: its record would come back
            self.registry.update_job(ev["job_id"], webhook=asdict(outcome))
        if not outcome.delivered:
            log.warning("webhook of job %s (%s) not delivered after %d attempt(s): %s", ev["job_id"], ev["event"],
                        attempts, error)

    def _next_due_in(self) -> float:
        first = self.registry.r.zrange(OUTBOX, 0, 0, withscores=True)
        return max(0.0, min(self.poll_s, first[0][1] - time.time())) if first else self.poll_s

    def start(self) -> None:
        """Run the delivery loop in a daemon thread of this process (once; later calls do nothing)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                while self.run_once():
                    pass
                wait = self._next_due_in()
            except Exception as exc:  # Redis away for a moment: try again shortly  # noqa: BLE001
                log.warning("webhook dispatcher: %s", exc)
                wait = self.poll_s
            self._wake.wait(wait)
            self._wake.clear()


class Notifier:
    """Registry's `on_finish` hook: put the job's webhook event, if it has one, in the outbox and wake
    this process's dispatcher (`start_dispatcher` also runs it before any job ends: the API and the
    workers do, so events whose process died are delivered by another)."""

    def __init__(self, settings: Settings) -> None:
        self.secret = settings.webhook_secret.get_secret_value()
        self.attempts, self.backoff_s = settings.webhook_attempts, settings.webhook_backoff_s
        self.allow_private = settings.webhook_allow_private
        self.dispatcher: Dispatcher | None = None
        self._lock = threading.Lock()

    def start_dispatcher(self, registry: Registry) -> Dispatcher | None:
        """This process's dispatcher, started (None when webhooks are off: no secret)."""
        if not self.secret:
            return None
        with self._lock:
            if self.dispatcher is None:
                self.dispatcher = Dispatcher(registry, self.secret, self.attempts, self.backoff_s, self.allow_private)
        self.dispatcher.start()
        return self.dispatcher

    def __call__(self, registry: Registry, job: dict[str, Any]) -> str | None:
        """The delivery id of the job's event, or None when it has no webhook."""
        url = job.get("webhook_url")
        if not url or not self.secret:
            return None
        dispatcher = self.start_dispatcher(registry)
        assert dispatcher is not None  # a secret is set
        return dispatcher.enqueue(url, {**job, "history": registry.history(job["id"])})


def start_dispatcher(registry: Registry) -> Dispatcher | None:
    """Run the webhook dispatcher of `registry`'s Notifier in this process (the API's start and each
    worker's call this); None when webhooks are off (no secret, or another on_finish hook)."""
    hook = registry.on_finish
    return hook.start_dispatcher(registry) if isinstance(hook, Notifier) else None
