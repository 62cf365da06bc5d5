"""``/metrics`` through prometheus_client: a real Prometheus parser reads it, and the counts move with requests."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.core.config import DEFAULT_MODEL_ID
from service.core.metrics import Metrics
from service.main import create_app
from tests.helpers.service import (
    FakeDetector,
    image_bytes,
    make_settings,
    register_dummy_model,
    running_server,
    wait_for,
)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition, keyed by (name, sorted labels), as the Prometheus parser reads them."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


DETECT_200 = dict(method="POST", route="/v1/detect", status="200")


def test_metrics_parse_and_request_counts_move_over_real_http(home):
    register_dummy_model(home, DEFAULT_MODEL_ID, classes=["thing"], imgsz=64)
    app = create_app(make_settings(home), detector_loader=lambda p: FakeDetector(p))
    with running_server(app) as url:
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 20, what="ready")
        before = _samples(httpx.get(f"{url}/metrics").text)
        frame = {"image": ("a.png", image_bytes(), "image/png")}
        for _ in range(3):
            assert httpx.post(f"{url}/v1/detect", files=frame).status_code == 200
        assert httpx.post(f"{url}/v1/detect?conf=7", files=frame).status_code == 422
        assert httpx.get(f"{url}/v1/jobs").status_code == 401
        assert httpx.get(f"{url}/no/such/page").status_code == 404
        text = httpx.get(f"{url}/metrics").text
        resp_type = httpx.get(f"{url}/metrics").headers["content-type"]

    assert resp_type.startswith("text/plain")
    families = _families(text)
    assert families["glasses_vision_http_requests"] == "counter"
    assert families["glasses_vision_http_request_duration_seconds"] == "histogram"
    assert families["glasses_vision_inference_duration_seconds"] == "histogram"
    assert families["glasses_vision_jobs"] == "gauge"
    # the process collector: memory, CPU and open files of the API process
    for name in ("process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds"):
        assert name in families, sorted(families)

    after = _samples(text)
    assert _value(after, "glasses_vision_http_requests_total", **DETECT_200) - \
        _value(before, "glasses_vision_http_requests_total", **DETECT_200) == 3
    assert _value(after, "glasses_vision_http_requests_total", method="POST", route="/v1/detect", status="422") == 1
    assert _value(after, "glasses_vision_http_requests_total", method="GET", route="/v1/jobs", status="401") == 1
    assert _value(after, "glasses_vision_http_requests_total", method="GET", route="unmatched", status="404") == 1
    # a request is counted once its response is sent: the second scrape sees the first one only
    assert _value(after, "glasses_vision_http_requests_total", method="GET", route="/metrics", status="200") == 1
    assert _value(after, "glasses_vision_http_request_duration_seconds_count", method="POST", route="/v1/detect") == 4
    assert _value(after, "glasses_vision_http_request_duration_seconds_bucket",
                  method="POST", route="/v1/detect", le="+Inf") == 4
    assert _value(after, "glasses_vision_inference_duration_seconds_count", model=DEFAULT_MODEL_ID) == 3
    assert _value(after, "glasses_vision_inference_duration_seconds_sum", model=DEFAULT_MODEL_ID) > 0
    assert _value(after, "glasses_vision_jobs", state="queued") == 0
    assert _value(after, "glasses_vision_models_loaded") == 1
    assert _value(after, "process_resident_memory_bytes") > 10 * 2**20


def test_gauges_follow_the_store_and_the_requests_in_flight(home):
    import threading

    register_dummy_model(home, DEFAULT_MODEL_ID, classes=["thing"], imgsz=64)
    gate = threading.Event()
    app = create_app(make_settings(home), detector_loader=lambda p: FakeDetector(p, gate=gate))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 20, what="ready")
        app.state.store.create({"request": {}}, job_id="job-a")
        app.state.store.create({"request": {}}, job_id="job-b")
        samples = _samples(c.get("/metrics").text)
        assert _value(samples, "glasses_vision_jobs", state="queued") == 2
        assert _value(samples, "glasses_vision_jobs", state="running") == 0

        # a detect held inside the detector shows as one in flight; once released, none
        frame = {"image": ("a.png", image_bytes(), "image/png")}
        holder = threading.Thread(target=lambda: c.post("/v1/detect", files=frame))
        holder.start()
        try:
            wait_for(lambda: app.state.limiter.in_flight == 1, 10, what="the detect in flight")
            assert _value(_samples(c.get("/metrics").text), "glasses_vision_inference_in_flight") == 1
        finally:
            gate.set()
            holder.join(10)
        samples = _samples(c.get("/metrics").text)
    assert _value(samples, "glasses_vision_inference_in_flight") == 0
    assert _value(samples, "glasses_vision_inference_duration_seconds_count", model=DEFAULT_MODEL_ID) == 1


def test_two_apps_keep_separate_counts():
    a, b = Metrics(process_metrics=False), Metrics(process_metrics=False)
    a.observe_request("GET", "/x", 200, 0.01)
    a.observe_request("GET", "/x", 200, 0.02)
    b.observe_request("GET", "/x", 200, 0.01)
    key = ("glasses_vision_http_requests_total", (("method", "GET"), ("route", "/x"), ("status", "200")))
    assert _samples(a.render({}, 0, 0))[key] == 2 and _samples(b.render({}, 0, 0))[key] == 1


@pytest.mark.parametrize("label", ['quote " and \\ backslash', "new\nline"])
def test_label_values_are_escaped(label):
    m = Metrics(process_metrics=False)
    m.observe_inference(label, 0.5)
    samples = _samples(m.render({}, 0, 0))
    assert samples[("glasses_vision_inference_duration_seconds_count", (("model", label),))] == 1
