"""GET /healthz (the process answers) and GET /readyz (Redis reachable, the artifact store answering and at
least one worker alive, with each worker's device)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import RegistryDep
from app.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    """Always ok while the process serves requests."""
    return Health()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, summary="Readiness")
def readyz(registry: RegistryDep) -> JSONResponse:
    """200 when Redis and the artifact store answer and a worker heartbeat is fresh; 503 otherwise, saying why."""
    # one PING without retries first: a Redis that is down makes this answer 503 at once, not after the
    # ~20 s the client's retries take to give up (a probe's own timeout is usually a second or two)
    redis_ok, live = registry.reachable(), {}
    if redis_ok:
        try:
            live = registry.workers()
        except Exception:  # noqa: BLE001 - any Redis failure means not ready
            redis_ok = False
    try:
        registry.store.check()
        store_error = None
    except OSError as exc:  # StoreUnavailable: a missing bucket, a refused credential, no endpoint
        store_error = str(exc)
    ready = redis_ok and bool(live) and store_error is None
    body = Readiness(status="ready" if ready else "not_ready", redis=redis_ok, store=store_error is None,
                     store_error=store_error, workers=sorted(live),
                     devices={name: _device_label(info.get("device")) for name, info in sorted(live.items())})
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def _device_label(device: dict | None) -> str:
    """A heartbeat's device as one string: "cpu", or "cuda:0 (NVIDIA H100)"; "unknown" from an older worker."""
    if not device:
        return "unknown"
    name = device.get("name")
    return f"{device['device']} ({name})" if device.get("device", "").startswith("cuda") and name else device["device"]
