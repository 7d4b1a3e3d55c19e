"""Jobs: GET /jobs (filters, paging), GET /jobs/{id}, POST /jobs/{id}/cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from app.api.deps import RegistryDep
from app.core.errors import ApiError
from app.core.security import WriteAccess, read_access
from app.registry import NotFound
from app.schemas import ErrorResponse, Job, JobPage, JobState

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(read_access)])


def _job(registry: RegistryDep, job_id: str) -> Job:
    try:
        return Job(**registry.get_job(job_id))
    except NotFound:
        raise ApiError(404, "unknown_job", f"no job with id {job_id!r}; list jobs with GET /jobs") from None


@router.get("", response_model=JobPage, summary="List jobs, newest first")
def list_jobs(
    registry: RegistryDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    name: Annotated[str | None, Query(description="only jobs training this model name")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    """Page through jobs; `total` counts every match."""
    items, total = registry.list_jobs(state=state, name=name, offset=offset, limit=limit)
    return JobPage(items=[Job(**j) for j in items], total=total, offset=offset, limit=limit)


@router.get("/{job_id}", response_model=Job, responses={404: {"model": ErrorResponse}},
            summary="A job's state, stage, progress, losses, ETA and result")
def get_job(job_id: str, registry: RegistryDep) -> Job:
    """Poll this until `state` is succeeded, failed or cancelled; `history` is the learning curve."""
    job = _job(registry, job_id)
    job.history = registry.history(job_id)
    return job


@router.post("/{job_id}/cancel", response_model=Job, status_code=202,
             responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
             summary="Cancel a queued job now, or a running one within one training step")
def cancel_job(job_id: str, registry: RegistryDep, response: Response, _: WriteAccess) -> Job:
    """200 when the job is cancelled already (it was queued), 202 when the running job will stop."""
    try:
        outcome = registry.request_cancel(job_id)
    except NotFound:
        raise ApiError(404, "unknown_job", f"no job with id {job_id!r}; list jobs with GET /jobs") from None
    if outcome not in ("cancelled_now", "requested"):
        raise ApiError(409, "job_finished", f"job {job_id} already {outcome}; there is nothing to cancel")
    response.status_code = 200 if outcome == "cancelled_now" else 202
    return _job(registry, job_id)
