"""Prometheus metrics for an operator, at ``GET /metrics`` (prometheus_client's text format).

- ``uplvp_http_requests_total{method, route, status}`` and ``uplvp_http_request_duration_seconds{method, route, status}``:
  every API request, measured by an ASGI middleware. `route` is the route's template
  (``/jobs/{job_id}``), so ids never multiply the series.
- ``uplvp_jobs{kind, state}``: jobs in the registry, counted when scraped.
- ``uplvp_queue_depth{queue}``: messages waiting in each Celery queue.
- ``uplvp_segment_latency_seconds``: the infer workers' segmentation calls (model load on a miss,
  decoding, forward, encoding). Workers run on other hosts, so they add their observations to
  buckets kept in Redis (`record_segment_latency`) and the API exposes them.
- ``uplvp_models_loaded{worker}``: models each live worker holds (from its heartbeat).

The API process keeps its own CollectorRegistry (one per app: tests build several).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from celery import Celery

    from app.registry import Registry

QUEUES = ("train", "infer")
SEGMENT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SEGMENT_KEY = "uplvp:metrics:segment_latency"  # hash: bucket upper bounds ("0.05", ..., "+Inf"), "sum"


def record_segment_latency(registry: Registry, seconds: float) -> None:
    """Add one segmentation call to the shared histogram (a worker calls this; one Redis round trip)."""
    pipe = registry.r.pipeline(transaction=False)
    for bound in SEGMENT_BUCKETS:
        if seconds <= bound:
            pipe.hincrby(SEGMENT_KEY, repr(bound), 1)
    pipe.hincrby(SEGMENT_KEY, "+Inf", 1)
    pipe.hincrbyfloat(SEGMENT_KEY, "sum", seconds)
    pipe.execute()


class RegistryCollector(Collector):
    """The metrics read from Redis and the broker at scrape time."""

    def __init__(self, registry: Registry, celery: Celery) -> None:
        self.registry, self.celery = registry, celery

    def collect(self) -> Iterator[Any]:
        jobs = GaugeMetricFamily("uplvp_jobs", "Jobs in the registry by kind and state", labels=["kind", "state"])
        for (kind, state), n in sorted(self.registry.job_counts().items()):
            jobs.add_metric([kind, state], n)
        yield jobs

        depth = GaugeMetricFamily("uplvp_queue_depth", "Messages waiting in a Celery queue", labels=["queue"])
        with self.celery.connection_for_read() as conn:
            channel = conn.default_channel
            for q in QUEUES:
                # not passive: kombu's Redis transport has no key for an empty queue, and a passive
                # declare of one fails; declaring creates nothing there (a list exists while it holds messages)
                depth.add_metric([q], channel.queue_declare(queue=q).message_count)
        yield depth

        raw = self.registry.r.hgetall(SEGMENT_KEY)
        buckets = [(repr(b), float(raw.get(repr(b), 0))) for b in SEGMENT_BUCKETS]
        buckets.append(("+Inf", float(raw.get("+Inf", 0))))
        yield HistogramMetricFamily("uplvp_segment_latency_seconds", "Segmentation calls in the infer workers",
                                    buckets=buckets, sum_value=float(raw.get("sum", 0)))

        loaded = GaugeMetricFamily("uplvp_models_loaded", "Models a live worker holds in memory", labels=["worker"])
        for worker, info in sorted(self.registry.workers().items()):
            if "models_loaded" in info:
                loaded.add_metric([worker], info["models_loaded"])
        yield loaded


class ApiMetrics:
    """The API's metrics: request counts and latencies, plus `RegistryCollector`."""

    def __init__(self, registry: Registry, celery: Celery) -> None:
        self.collectors = CollectorRegistry()
        self.requests = Counter("uplvp_http_requests_total", "API requests", ["method", "route", "status"],
                                registry=self.collectors)
        self.latency = Histogram("uplvp_http_request_duration_seconds", "API request latency",
                                 ["method", "route", "status"], registry=self.collectors)
        self.collectors.register(RegistryCollector(registry, celery))

    def exposition(self) -> bytes:
        """The text format of every metric, as a scrape gets it."""
        return generate_latest(self.collectors)


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by its route template and status."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status, root = time.perf_counter(), 500, scope.get("root_path", "")

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # the router has put the matched route into the scope by now (FastAPI's APIRoute); a Mount
            # (the static files) extends root_path instead
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                mounted = scope.get("root_path", "")
                route = mounted[len(root):] if mounted.startswith(root) and len(mounted) > len(root) else "<unmatched>"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route, str(status)).observe(time.perf_counter() - t0)
