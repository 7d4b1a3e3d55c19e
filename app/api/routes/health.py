"""GET /healthz (the process answers) and GET /readyz (Redis reachable and at least one worker alive)."""

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
    """200 when Redis answers and a worker heartbeat is fresh; 503 otherwise."""
    try:
        redis_ok = bool(registry.r.ping())
        workers = sorted(registry.workers())
    except Exception:  # noqa: BLE001 - any Redis failure means not ready
        redis_ok, workers = False, []
    ready = redis_ok and bool(workers)
    body = Readiness(status="ready" if ready else "not_ready", redis=redis_ok, workers=workers)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
