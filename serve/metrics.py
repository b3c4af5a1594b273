"""The service's Prometheus metrics, in its own registry, and the ASGI middleware that counts
every request by route template (bounded: unmatched paths count as "other") and status."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from streams.buckets import BATCH_SIZE_BUCKETS, INFERENCE_BUCKETS, LATENCY_BUCKETS

# Long-lived responses (the live alert stream) would swamp the latency histogram.
UNTIMED_ROUTES = frozenset({"/v1/alerts/stream"})
DOC_PATHS = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})


class ServeMetrics:
    """Every metric `vaewatch serve` exports."""

    def __init__(self, *, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "vaewatch_serve_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "vaewatch_serve_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route and status.",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.images = Counter(
            "vaewatch_serve_images",
            "Images scored or explained, by outcome (normal, anomaly).",
            ["outcome"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "vaewatch_serve_batch_size_images",
            "Images per micro-batch sent to the device.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "vaewatch_serve_batch_inference_seconds",
            "Time to score one micro-batch on the device.",
            buckets=INFERENCE_BUCKETS,
            registry=registry,
        )
        self.queued_images = Gauge(
            "vaewatch_serve_queued_images",
            "Images waiting for a micro-batch.",
            registry=registry,
        )
        self.rejected = Counter(
            "vaewatch_serve_rejected",
            "Requests turned away with 503 because the batching queue was full.",
            registry=registry,
        )
        self.model = Info("vaewatch_serve_model", "The model bundle served.", registry=registry)
        for outcome in ("normal", "anomaly"):
            self.images.labels(outcome=outcome)


def _route_label(scope: dict) -> str:
    """The matched route's template; plain Starlette routes (the docs) carry no route object,
    only their endpoint, so their fixed path stands in. Anything unmatched is "other"."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    path = scope.get("path", "")
    if path.startswith("/static/"):
        return "/static"
    if "endpoint" in scope and path in DOC_PATHS:
        return path
    return "other"


class MetricsMiddleware:
    """Pure ASGI (no response buffering, so streamed responses pass straight through)."""

    def __init__(self, app: Any, *, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_with_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            template = _route_label(scope)
            code = str(status[0])
            self.metrics.requests.labels(
                route=template, method=scope.get("method", "?"), status=code
            ).inc()
            if template not in UNTIMED_ROUTES:
                self.metrics.request_seconds.labels(route=template, status=code).observe(
                    time.perf_counter() - started
                )
