"""Request counters and latency histograms, rendered in the Prometheus text format (0.0.4)."""

from __future__ import annotations

import bisect
import threading
import time
from typing import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(**labels: str) -> str:
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


class Histogram:
    """A cumulative-bucket histogram of seconds."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds

    def render(self, name: str, **labels: str) -> list[str]:
        lines, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f"{name}_bucket{_labels(**labels, le=le)} {running}")
        lines.append(f"{name}_sum{_labels(**labels)} {self.total:.6f}")
        lines.append(f"{name}_count{_labels(**labels)} {running}")
        return lines


class Metrics:
    """Thread-safe counters for HTTP requests and model inference."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.inference: dict[str, Histogram] = {}
        self.rejected: dict[str, int] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (method, route, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault((method, route), Histogram()).observe(seconds)

    def observe_inference(self, model: str, seconds: float) -> None:
        with self._lock:
            self.inference.setdefault(model, Histogram()).observe(seconds)

    def count_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def render(self, jobs_by_state: Mapping[str, int], models_loaded: int, in_flight: int) -> str:
        """The whole exposition, ending with a newline."""
        out: list[str] = []
        with self._lock:
            out += ["# HELP glasses_vision_http_requests_total HTTP requests by method, route and status.",
                    "# TYPE glasses_vision_http_requests_total counter"]
            for (method, route, status), n in sorted(self.requests.items()):
                out.append(f"glasses_vision_http_requests_total{_labels(method=method, route=route, status=status)} {n}")
            out += ["# HELP glasses_vision_http_request_duration_seconds HTTP request latency.",
                    "# TYPE glasses_vision_http_request_duration_seconds histogram"]
            for (method, route), hist in sorted(self.latency.items()):
                out += hist.render("glasses_vision_http_request_duration_seconds", method=method, route=route)
            out += ["# HELP glasses_vision_inference_duration_seconds Model inference time per image.",
                    "# TYPE glasses_vision_inference_duration_seconds histogram"]
            for model, hist in sorted(self.inference.items()):
                out += hist.render("glasses_vision_inference_duration_seconds", model=model)
            out += ["# HELP glasses_vision_rejected_requests_total Requests refused by a limit.",
                    "# TYPE glasses_vision_rejected_requests_total counter"]
            for reason, n in sorted(self.rejected.items()):
                out.append(f"glasses_vision_rejected_requests_total{_labels(reason=reason)} {n}")
        out += ["# HELP glasses_vision_jobs Jobs in the store by state.", "# TYPE glasses_vision_jobs gauge"]
        for state, n in sorted(jobs_by_state.items()):
            out.append(f"glasses_vision_jobs{_labels(state=state)} {n}")
        out += ["# HELP glasses_vision_models_loaded ONNX sessions loaded.", "# TYPE glasses_vision_models_loaded gauge",
                f"glasses_vision_models_loaded {models_loaded}",
                "# HELP glasses_vision_inference_in_flight Detect requests being served.",
                "# TYPE glasses_vision_inference_in_flight gauge", f"glasses_vision_inference_in_flight {in_flight}"]
        return "\n".join(out) + "\n"


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
