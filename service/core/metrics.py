"""The service's Prometheus metrics, kept by ``prometheus_client``.

One ``CollectorRegistry`` per app (so two apps in one process, as in the tests, do not share counts) holds the
request counters and latency histograms, the inference histogram, the rejection counter, three gauges set at
scrape time (jobs by state, models loaded, detects in flight) and ``prometheus_client``'s process collector
(``process_resident_memory_bytes``, ``process_cpu_seconds_total``, ``process_open_fds``, ...) and platform
collector (``python_info``).
"""

from __future__ import annotations

import threading
import time
from typing import Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PREFIX = "glasses_vision"


class Metrics:
    """The app's metrics; counters and histograms are thread-safe (``prometheus_client`` locks them)."""

    def __init__(self, registry: CollectorRegistry | None = None, process_metrics: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_http_requests_total", "HTTP requests by method, route and status.",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram(f"{PREFIX}_http_request_duration_seconds", "HTTP request latency.",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram(f"{PREFIX}_inference_duration_seconds", "Model inference time per image.",
                                   ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter(f"{PREFIX}_rejected_requests_total", "Requests refused by a limit.", ["reason"],
                                registry=r)
        self.jobs = Gauge(f"{PREFIX}_jobs", "Jobs in the store by state.", ["state"], registry=r)
        self.models_loaded = Gauge(f"{PREFIX}_models_loaded", "ONNX sessions loaded.", registry=r)
        self.in_flight = Gauge(f"{PREFIX}_inference_in_flight", "Detect requests being served.", registry=r)
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self._scrape_lock = threading.Lock()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_inference(self, model: str, seconds: float) -> None:
        self.inference.labels(model).observe(seconds)

    def count_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def render(self, jobs_by_state: Mapping[str, int], models_loaded: int, in_flight: int) -> str:
        """Set the scrape-time gauges and return the exposition in the Prometheus text format."""
        with self._scrape_lock:  # two scrapes at once must not interleave clearing and setting the job gauge
            self.jobs.clear()
            for state, n in jobs_by_state.items():
                self.jobs.labels(state).set(n)
            self.models_loaded.set(models_loaded)
            self.in_flight.set(in_flight)
            return generate_latest(self.registry).decode("utf-8")


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by its route template and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(scope["method"], route, status, time.perf_counter() - start)
