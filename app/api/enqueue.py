"""Sending tasks to the workers. `enqueue`: a recorded job's task to its queue, the one place that turns
a broker failure into a failed job and a 503, and that names the job's status URL. `call_infer`: a
synchronous call on the `infer` queue (POST /segment, an ONNX export), the one place that bounds the
wait and turns a silent worker into a 504."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout

from app.core.errors import ApiError
from app.registry import Registry


def enqueue(registry: Registry, celery: Celery, job_id: str, task: str, args: list[Any], queue: str,
            expires: float | None = None) -> str:
    """Send `task` (its Celery id is the job id) to `queue`, to run within `expires` s if given (a worker
    drops it after that); returns the job's Location path."""
    try:
        celery.send_task(task, args=args, task_id=job_id, queue=queue, expires=expires)
    except Exception as exc:  # noqa: BLE001 - broker unreachable
        registry.finish_job(job_id, "failed", error={"code": "queue_unavailable", "message": str(exc)})
        raise ApiError(503, "queue_unavailable", f"could not queue the job: {exc}") from None
    return f"/jobs/{job_id}"


def call_infer(celery: Celery, task: str, args: list[Any], timeout: float, code: str, what: str,
               setting: str) -> dict[str, Any]:
    """Run `task` on the `infer` queue and wait for its answer at most `timeout` s; a 504 `code` saying
    that no infer worker did `what` in time (and which `setting` sets the wait) otherwise. The message
    expires with the wait, so a worker that comes back later does not run a call nobody awaits."""
    res = celery.send_task(task, args=args, queue="infer", expires=timeout)
    try:
        return res.get(timeout=timeout)
    except CeleryTimeout:
        res.forget()
        raise ApiError(504, code, f"no infer worker {what} within {timeout:g} s ({setting}); check GET /readyz") from None
