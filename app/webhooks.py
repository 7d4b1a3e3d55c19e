"""Job webhooks: a signed POST to the job's `webhook_url` when it succeeds, fails or is cancelled.

The body is ``{"event": "job.succeeded" | "job.failed" | "job.cancelled", "job": <GET /jobs/{id}'s
record>}``, signed with HMAC-SHA256 under the server's ``UPLVP_WEBHOOK_SECRET``: the header
``X-Uplvp-Signature: sha256=<hex digest of the raw body>`` (check it with `verify`, or any HMAC
library, before trusting the body). ``X-Uplvp-Event`` names the event and ``X-Uplvp-Delivery`` is
one id per event (the same on every retry, so a receiver can drop repeats).

Delivery runs in a background thread of whichever process ended the job (worker, or the API for a
job cancelled while queued): ``UPLVP_WEBHOOK_ATTEMPTS`` attempts with exponential back-off from
``UPLVP_WEBHOOK_BACKOFF_S``, retried on network errors, timeouts, 408, 429 and 5xx only. A hook
that fails never fails the job; the outcome is kept on the job as ``webhook``.

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
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

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


def deliver(url: str, event: str, job: dict[str, Any], secret: str, attempts: int, backoff_s: float,
            allow_private: bool, sleep: Any = time.sleep) -> Delivery:
    """POST the signed event to `url`, retrying transient failures; never raises."""
    body = json.dumps({"event": event, "job": job}, separators=(",", ":"), default=str).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "uplvp-webhook/1", EVENT_HEADER: event,
               DELIVERY_HEADER: uuid.uuid4().hex, SIGNATURE_HEADER: sign(body, secret)}
    out = Delivery(event=event)
    for i in range(attempts):
        if i:
            sleep(backoff_s * 2 ** (i - 1))
        out.attempts = i + 1
        try:
            check_url(url, allow_private)  # again: the name may resolve elsewhere now
            with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False, trust_env=False) as client:
                resp = client.post(url, content=body, headers=headers)
        except WebhookRefused as exc:
            out.error = str(exc)
            break  # not transient
        except httpx.HTTPError as exc:
            out.error = f"{type(exc).__name__}: {exc}"
            continue
        out.status = resp.status_code
        if 200 <= resp.status_code < 300:
            out.delivered, out.error = True, None
            break
        out.error = f"the receiver answered {resp.status_code}"
        if resp.status_code not in RETRY_STATUS and resp.status_code < 500:
            break  # the receiver refused this event: sending it again will not help
    out.finished_at = time.time()
    return out


class Notifier:
    """Registry's `on_finish` hook: deliver the job's webhook, if it has one, in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.secret = settings.webhook_secret.get_secret_value()
        self.attempts, self.backoff_s = settings.webhook_attempts, settings.webhook_backoff_s
        self.allow_private = settings.webhook_allow_private

    def __call__(self, registry: Registry, job: dict[str, Any]) -> threading.Thread | None:
        url = job.get("webhook_url")
        if not url or not self.secret:
            return None
        thread = threading.Thread(target=self._run, args=(registry, url, job), name=f"webhook-{job['id']}", daemon=True)
        thread.start()
        return thread

    def _run(self, registry: Registry, url: str, job: dict[str, Any]) -> None:
        event = f"job.{job['state']}"
        try:
            job = {**job, "history": registry.history(job["id"])}
            outcome = deliver(url, event, job, self.secret, self.attempts, self.backoff_s, self.allow_private)
            registry.update_job(job["id"], webhook=asdict(outcome))
            if not outcome.delivered:
                log.warning("webhook of job %s (%s) not delivered after %d attempt(s): %s", job["id"], event,
                            outcome.attempts, outcome.error)
        except Exception:  # a hook never takes a worker down  # noqa: BLE001
            log.exception("webhook of job %s failed", job.get("id"))
