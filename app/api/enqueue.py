"""Sending a recorded job's task to its queue: the one place that turns a broker failure into a
failed job and a 503, and that names the job's status URL."""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.core.errors import ApiError
from app.registry import Registry


def enqueue(registry: Registry, celery: Celery, job_id: str, task: str, args: list[Any], queue: str) -> str:
    """Send `task` (its Celery id is the job id) to `queue`; returns the job's Location path."""
    try:
        celery.send_task(task, args=args, task_id=job_id, queue=queue)
    except Exception as exc:  # noqa: BLE001 - broker unreachable
        registry.finish_job(job_id, "failed", error={"code": "queue_unavailable", "message": str(exc)})
        raise ApiError(503, "queue_unavailable", f"could not queue the job: {exc}") from None
    return f"/jobs/{job_id}"
