"""GET /metrics: Prometheus metrics (app/metrics.py), behind the read keys like the other read endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.core.security import read_access

router = APIRouter(tags=["health"], dependencies=[Depends(read_access)])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """Requests per route and status with latencies, jobs by state, queue depths, the infer workers'
    segmentation latency and the models they hold, in Prometheus' text format."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
