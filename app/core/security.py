"""API keys and per-key rate limits.

`UPLVP_API_KEYS` is a comma-separated list of keys; an entry `KEY:read` is read-only (it may
segment, list and download, not train, cancel, promote or delete). Clients send a key as
`Authorization: Bearer KEY` or `X-API-Key: KEY`; keys are compared in constant time, and only
a digest of a key (its id) is ever stored or logged. With no keys configured every request is
allowed, which is why `python -m app` (and `uplvp serve`) refuse to listen on anything but
loopback then.

Rate limits are fixed windows counted in Redis (so they hold across API replicas): answers over
the limit are 429 with `Retry-After` seconds until the window ends.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.api.deps import RegistryDep, SettingsDep
from app.core.errors import ApiError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Principal:
    """Who is calling: `id` is a key's digest (or `anon:<client ip>` in open mode)."""

    id: str
    can_write: bool
    anonymous: bool = False


def parse_api_keys(spec: str) -> list[tuple[str, bool]]:
    """"k1,k2:read" -> [("k1", True), ("k2", False)]; ValueError naming a bad entry."""
    keys: list[tuple[str, bool]] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        key, _, role = entry.partition(":")
        if role not in ("", "read", "write"):
            raise ValueError(f"UPLVP_API_KEYS: entry '…:{role}' has an unknown role; use KEY or KEY:read")
        if len(key) < 16:
            raise ValueError(f"UPLVP_API_KEYS: a key of {len(key)} characters is too short; use at least 16 "
                             "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")
        keys.append((key, role != "read"))
    return keys


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key (stored with the jobs it submits)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _supplied_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def read_access(request: Request, settings: SettingsDep) -> Principal:
    """Any valid key (or anyone, with no keys configured); 401 otherwise."""
    keys = parse_api_keys(settings.api_keys.get_secret_value())
    if not keys:
        host = request.client.host if request.client else "unknown"
        return Principal(id=f"anon:{host}", can_write=True, anonymous=True)
    supplied = _supplied_key(request)
    if not supplied:
        raise ApiError(401, "missing_api_key", "this service needs an API key: send `Authorization: Bearer <key>` "
                       "or `X-API-Key: <key>`", headers={"WWW-Authenticate": "Bearer"})
    found: tuple[str, bool] | None = None
    for key, write in keys:  # every key is compared, each in constant time
        if hmac.compare_digest(supplied.encode(), key.encode()):
            found = (key, write)
    if found is None:
        raise ApiError(401, "invalid_api_key", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    return Principal(id=key_id(found[0]), can_write=found[1])


def write_access(principal: Annotated[Principal, Depends(read_access)]) -> Principal:
    """A key allowed to change things (train, cancel, promote, delete); 403 for a read-only key."""
    if not principal.can_write:
        raise ApiError(403, "read_only_key", "this API key is read-only: it may segment and read, not train, "
                       "cancel, promote or delete")
    return principal


ReadAccess = Annotated[Principal, Depends(read_access)]
WriteAccess = Annotated[Principal, Depends(write_access)]


def rate_limit(registry: RegistryDep, principal: Principal, bucket: str, limit: int, window_s: int) -> None:
    """Count one request of `principal` in `bucket`; 429 with Retry-After past `limit` per `window_s`."""
    if limit <= 0:
        return
    now = time.time()
    window = int(now // window_s)
    key = f"uplvp:rate:{bucket}:{principal.id}:{window}"
    pipe = registry.r.pipeline()
    pipe.incr(key)
    pipe.expire(key, window_s + 5)
    count = pipe.execute()[0]
    if count > limit:
        retry = max(1, int((window + 1) * window_s - now) + 1)
        raise ApiError(429, "rate_limited", f"more than {limit} {bucket} requests per {window_s} s for this key; "
                       f"retry in {retry} s", headers={"Retry-After": str(retry)})


def segment_quota(registry: RegistryDep, settings: SettingsDep, principal: ReadAccess) -> Principal:
    """POST /segment: read access and the per-key rate (UPLVP_RATE_SEGMENT_PER_MIN)."""
    rate_limit(registry, principal, "segment", settings.rate_segment_per_min, 60)
    return principal


def job_quota(registry: RegistryDep, settings: SettingsDep, principal: WriteAccess) -> Principal:
    """Job submission: write access, the per-key rate (UPLVP_RATE_JOBS_PER_HOUR) and the cap on the
    key's queued or running jobs (UPLVP_MAX_ACTIVE_JOBS_PER_KEY)."""
    active = sum(1 for j in registry.active_jobs() if j.get("owner") == principal.id and j["kind"] != "segment")
    if active >= settings.max_active_jobs_per_key:
        raise ApiError(429, "too_many_jobs", f"this key has {active} queued or running jobs (the cap is "
                       f"{settings.max_active_jobs_per_key}); wait for one to finish or cancel one",
                       headers={"Retry-After": "30"})
    rate_limit(registry, principal, "job", settings.rate_jobs_per_hour, 3600)
    return principal


SegmentAccess = Annotated[Principal, Depends(segment_quota)]
JobAccess = Annotated[Principal, Depends(job_quota)]
