"""POST /segment: run a registered model on images (on the `infer` queue) and answer synchronously."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any, Literal

from celery import Celery
from fastapi import APIRouter, File, Form, Response, UploadFile
from fastapi.responses import JSONResponse

from app.api.deps import CeleryDep, RegistryDep, SettingsDep
from app.api.enqueue import call_infer, enqueue
from app.api.forms import WebhookField
from app.core.errors import ApiError
from app.core.security import SegmentAccess
from app.dataset import image_problem
from app.registry import NotFound, Registry
from app.schemas import ErrorResponse, JobAccepted, SegmentResponse
from worker.celery_app import SEGMENT_JOB_TASK, SEGMENT_TASK

router = APIRouter(tags=["segment"])


def resolve_model(registry: Registry, model: str, version: int | None) -> dict[str, Any]:
    """The version record, or a 404 naming the unknown model or version."""
    try:
        return registry.resolve(model, version)
    except NotFound as exc:
        msg = exc.args[0]
        code = "unknown_version" if "version" in msg else "unknown_model"
        raise ApiError(404, code, f"{msg}; see GET /models") from None


def queue_segment_job(registry: Registry, celery: Celery, rec: dict[str, Any], payload: list[list[str]],
                      score_threshold: float, owner: str, expires: float, webhook_url: str | None = None) -> JSONResponse:
    """async=true: record a segment job and send it to the `infer` queue, to start within `expires` s
    (after that its message is dropped and the reaper fails the job: Registry.fail_unstarted); 202 + Location."""
    job_id = registry.new_job_id()
    params = {"model": rec["name"], "version": rec["version"], "score_threshold": score_threshold,
              "images": len(payload)}
    registry.create_job(job_id, rec["name"], params, {"num_images": len(payload)}, f"{rec['name']}:{rec['version']}",
                        kind="segment", owner=owner, webhook_url=webhook_url)
    location = enqueue(registry, celery, job_id, SEGMENT_JOB_TASK,
                       [job_id, rec["artifact"], rec["sha256"], payload, score_threshold, "json", rec["name"],
                        rec["version"]], "infer", expires=expires)
    body = JobAccepted(id=job_id, state="queued", location=location).model_dump()
    return JSONResponse(body, status_code=202, headers={"Location": location, "Retry-After": "1"})


@router.post("/segment", response_model=SegmentResponse,
             responses={200: {"content": {"image/png": {}}, "description": "instances (json) or an overlay (png)"},
                        400: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                        202: {"model": JobAccepted, "description": "async=true: the job to poll"},
                        413: {"model": ErrorResponse}, 504: {"model": ErrorResponse}},
             summary="Segment images with a model version (default: production, else latest)")
def post_segment(
    registry: RegistryDep,
    settings: SettingsDep,
    celery: CeleryDep,
    principal: SegmentAccess,
    webhook_url: WebhookField,
    images: Annotated[list[UploadFile], File(description="one or more images (JPEG, PNG, BMP, TIFF, WebP)")],
    model: Annotated[str, Form(examples=["shelves"])],
    version: Annotated[int | None, Form(ge=1, description="default: the production version, else the latest")] = None,
    score_threshold: Annotated[float, Form(ge=0.0, le=1.0)] = 0.3,
    format: Annotated[Literal["json", "png"], Form(description="json: instances; png: an overlay (one image)")] = "json",
    async_: Annotated[bool, Form(alias="async", description="true: answer 202 with a job at once; its `output` "
                                 "holds the instances when it succeeds (json only)")] = False,
) -> Any:
    """Instances per image (category, score, bbox, RLE, polygons) or a PNG overlay; or, with
    async=true, a job (202 + Location) whose `output` holds the instances. A synchronous answer's
    Server-Timing header says where its time went: checking the upload here, the infer worker's own
    work (decode, model, encode), and the queue's round trip around it."""
    t0 = time.perf_counter()
    if webhook_url and not async_:
        raise ApiError(400, "webhook_needs_async", "a webhook is called when a job ends: send async=true with it (a "
                       "synchronous request answers with the instances themselves)")
    rec = resolve_model(registry, model, version)
    if len(images) > settings.max_segment_images:
        raise ApiError(400, "too_many_images", f"{len(images)} images sent; at most {settings.max_segment_images} "
                       "per request (UPLVP_MAX_SEGMENT_IMAGES)")
    if async_ and format != "json":
        raise ApiError(400, "async_json_only", "async=true stores instances in the job: use format=json, or "
                       "async=false for a PNG overlay")
    if format == "png" and len(images) != 1:
        raise ApiError(400, "png_needs_one_image", f"format=png returns one overlay: send exactly one image "
                       f"(got {len(images)}), or use format=json")
    cap, total = int(settings.max_upload_mb * 2**20), 0
    payload: list[list[str]] = []
    for i, up in enumerate(images):
        data = up.file.read()
        total += len(data)
        if total > cap:
            raise ApiError(413, "upload_too_large", f"images larger than {settings.max_upload_mb:g} MB in total")
        name = up.filename or f"image_{i}"
        why, _ = image_problem(data, settings.max_image_pixels)
        if why:
            raise ApiError(400, "unsupported_image", f"{name} {why}; send JPEG, PNG, BMP, TIFF or WebP files",
                           [{"file": name, "problem": why}])
        payload.append([name, base64.b64encode(data).decode("ascii")])
    if async_:
        return queue_segment_job(registry, celery, rec, payload, score_threshold, principal.id,
                                 settings.segment_job_expiry_s, webhook_url)
    t1 = time.perf_counter()
    out = call_infer(celery, SEGMENT_TASK, [rec["artifact"], rec["sha256"], payload, score_threshold, format,
                                            rec["name"], rec["version"]],
                     settings.segment_timeout_s, "segment_timeout", "answered", "UPLVP_SEGMENT_TIMEOUT_S")
    if "error" in out:
        # ours to fix (500), the worker's memory (503: smaller or fewer images, or later), else the request (400)
        status = {"artifact_unavailable": 500, "out_of_memory": 503}.get(out["error"]["code"], 400)
        raise ApiError(status, out["error"]["code"], out["error"]["message"])
    infer_ms, worker_ms = 1000 * (time.perf_counter() - t1), float(out.get("worker_ms", 0.0))
    headers = {"X-Model": rec["name"], "X-Model-Version": str(rec["version"]), "X-Backend": out.get("backend", ""),
               "Server-Timing": f"check;dur={1000 * (t1 - t0):.1f}, worker;dur={worker_ms:.1f}, "
                                f"queue;dur={max(0.0, infer_ms - worker_ms):.1f}"}
    if format == "png":
        return Response(base64.b64decode(out["results"][0]["png_base64"]), media_type="image/png", headers=headers)
    body = SegmentResponse(model=rec["name"], version=rec["version"], backend=out.get("backend"), images=out["results"])
    return JSONResponse(body.model_dump(), headers=headers)
