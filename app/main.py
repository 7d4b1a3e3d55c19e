"""FastAPI application factory: ``uvicorn --factory app.main:create_app``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.api.routes import finetune, health, jobs, metrics, models, pretrain, segment
from app.core.config import Settings, get_settings
from app.core.errors import install_error_handlers
from app.core.security import parse_api_keys
from app.metrics import ApiMetrics, RequestMetrics
from app.registry import from_settings
from app.schemas import ErrorResponse
from app.webhooks import start_dispatcher

STATIC = Path(__file__).parent / "static"
DESCRIPTION = """Fine-tune K-Net instance-segmentation models on small COCO datasets and serve them.

* `POST /finetune` uploads a COCO zip and queues a job (202 + `Location: /jobs/{id}`); poll `GET /jobs/{id}`.
* `POST /segment` runs a registered model on images (JSON instances or a PNG overlay).
* `/models` lists versions, promotes one to `production`, downloads or deletes them.

Every error is `{"error": {"code", "message", "details"}}`, the message saying what to fix.

Authentication (when the server has keys): `Authorization: Bearer <key>` or `X-API-Key: <key>`;
read-only keys may segment, list and download. Over a rate limit: 429 with `Retry-After`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for `settings` (default: from the environment, validated now)."""
    from worker.celery_app import make_celery

    settings = settings or get_settings()
    parse_api_keys(settings.api_keys.get_secret_value())  # a malformed UPLVP_API_KEYS stops the start, naming why
    # The body cap streams: an over-size upload is refused with 413 while it arrives, not after.
    max_body = int(settings.max_upload_mb * 2**20) + 2**20  # + multipart overhead and form fields

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start_dispatcher(app.state.registry)  # webhook events of jobs that ended anywhere (app/webhooks.py)
        yield

    app = FastAPI(title="uplvp", version="0.1.0", description=DESCRIPTION, max_body_size=max_body, lifespan=lifespan,
                  responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
                             403: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                             429: {"model": ErrorResponse}})
    app.state.settings = settings
    app.state.registry = from_settings(settings)
    app.state.celery = make_celery(settings)
    install_error_handlers(app)
    app.state.metrics = ApiMetrics(app.state.registry, app.state.celery)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    for module in (finetune, pretrain, jobs, segment, models, health, metrics):
        app.include_router(module.router)
    # The web page: static files, no build step. Its JS calls the JSON API above with the user's key.
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app
