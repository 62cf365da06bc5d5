"""The HTTP layer with FastAPI's TestClient: every endpoint, auth, limits and every bad-input case.

Inference here runs a FakeDetector (injected through ``create_app(detector_loader=...)``) so these tests
check routing, validation and error mapping; tests/test_service_real.py runs the real runtime.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import warnings

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.core.config import DEFAULT_MODEL_ID, Settings
from service.main import create_app
from tests.helpers.service import (
    make_client,
    API_KEY,
    AUTH,
    FakeDetector,
    image_bytes,
    make_settings,
    register_dummy_model,
    wait_for,
    yolo_zip,
)

warnings.filterwarnings("ignore", category=DeprecationWarning)


def _assert_error(resp, status, *words):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "message"} and body["message"], body
    for word in words:
        assert word in body["message"], body["message"]


# ---------------------------------------------------------------- health, readiness, metrics, OpenAPI
def test_healthz_readyz_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok", "job_workers_alive": 0, "job_workers_configured": 0}
    assert client.get("/readyz").json() == {"status": "ready", "default_model": DEFAULT_MODEL_ID}
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/detect", "/v1/models", "/v1/models/{model_id}", "/v1/jobs", "/v1/jobs/{job_id}",
                 "/v1/jobs/{job_id}/logs", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/resume",
                 "/healthz", "/readyz", "/metrics"):
        assert path in paths, path
    detect_body = paths["/v1/detect"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(detect_body)
    assert "example" in paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert "APIKeyHeader" in spec["components"]["securitySchemes"]


def test_readyz_is_503_until_the_default_model_loads(home):
    gate = threading.Event()

    def slow_loader(path):
        gate.wait(10)
        return FakeDetector(path)

    with make_client(home, loader=slow_loader) as c:
        _assert_error(c.get("/readyz"), 503, "still being exported or loaded")
        assert c.get("/healthz").status_code == 200  # liveness is separate
        _assert_error(c.post("/v1/detect", files={"image": ("a.png", image_bytes(), "image/png")}), 503, "/readyz")
        gate.set()
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, what="ready")


def test_readyz_reports_a_default_model_that_cannot_be_prepared(tmp_path):
    app = create_app(make_settings(tmp_path / "h", default_model="nothing-here"), detector_loader=FakeDetector)
    with TestClient(app) as c:
        wait_for(lambda: "could not be prepared" in c.get("/readyz").text, 10, what="startup error")
        _assert_error(c.get("/readyz"), 503, "nothing-here", "GLASSES_VISION_DEFAULT_MODEL_SOURCE")


def test_metrics_prometheus_text(client):
    client.post("/v1/detect", files={"image": ("a.png", image_bytes(), "image/png")})
    client.post("/v1/detect?conf=5", files={"image": ("a.png", image_bytes(), "image/png")})
    text = client.get("/metrics").text
    assert 'glasses_vision_http_requests_total{method="POST",route="/v1/detect",status="200"} 1' in text
    assert 'glasses_vision_http_requests_total{method="POST",route="/v1/detect",status="422"} 1' in text
    assert 'glasses_vision_http_request_duration_seconds_bucket{le="+Inf",method="POST",route="/v1/detect"} 2' in text
    assert f'glasses_vision_inference_duration_seconds_count{{model="{DEFAULT_MODEL_ID}"}} 1' in text
    assert 'glasses_vision_jobs{state="queued"} 0' in text
    assert "# TYPE glasses_vision_jobs gauge" in text


# ---------------------------------------------------------------- detect
def test_detect_multipart_and_json_give_the_same_boxes(client):
    png = image_bytes(80, 60)
    a = client.post("/v1/detect", files={"image": ("a.png", png, "image/png")})
    b = client.post("/v1/detect", json={"image_base64": base64.b64encode(png).decode()})
    c = client.post("/v1/detect", json={"image_base64": "data:image/png;base64," + base64.b64encode(png).decode()})
    assert a.status_code == b.status_code == c.status_code == 200
    body = a.json()
    assert body["model"] == DEFAULT_MODEL_ID and body["image"] == {"width": 80, "height": 60}
    assert body["detections"] == [
        {"x1": 1.0, "y1": 1.0, "x2": 79.0, "y2": 59.0, "score": 0.9, "class_id": 0, "class_name": "thing"}
    ]
    assert body["inference_ms"] >= 0
    assert b.json()["detections"] == c.json()["detections"] == body["detections"]


def test_detect_jpeg_and_query_params(client):
    resp = client.post("/v1/detect?conf=0.95&iou=0.5&max_det=1",
                       files={"image": ("a.jpg", image_bytes(fmt="JPEG"), "image/jpeg")})
    assert resp.status_code == 200 and resp.json()["detections"] == []  # the fake's 0.9 box is below conf


@pytest.mark.parametrize("query, field", [
    ("conf=1.5", "conf"), ("conf=-0.1", "conf"), ("iou=2", "iou"), ("max_det=0", "max_det"),
    ("max_det=-3", "max_det"), ("conf=abc", "conf"),
])
def test_detect_bad_params_are_422(client, query, field):
    resp = client.post(f"/v1/detect?{query}", files={"image": ("a.png", image_bytes(), "image/png")})
    _assert_error(resp, 422, field)


def test_detect_unknown_model_is_404(client):
    resp = client.post("/v1/detect?model=kitchen", files={"image": ("a.png", image_bytes(), "image/png")})
    _assert_error(resp, 404, "kitchen", DEFAULT_MODEL_ID)
    resp = client.post("/v1/detect?model=../../etc", files={"image": ("a.png", image_bytes(), "image/png")})
    _assert_error(resp, 404, "unknown model")


def test_detect_not_an_image_is_415_and_corrupt_is_422(client):
    _assert_error(client.post("/v1/detect", files={"image": ("a.txt", b"hello, not an image", "text/plain")}),
                  415, "JPEG")
    _assert_error(client.post("/v1/detect", files={"image": ("a.png", b"", "image/png")}), 415, "empty")
    truncated = image_bytes(64, 64)[:200]
    _assert_error(client.post("/v1/detect", files={"image": ("a.png", truncated, "image/png")}), 422, "corrupt")
    _assert_error(client.post("/v1/detect", json={"image_base64": "!!!notbase64"}), 422, "base64")
    _assert_error(client.post("/v1/detect", json={"wrong": 1}), 422, "image_base64")
    _assert_error(client.post("/v1/detect", content=b"{not json", headers={"content-type": "application/json"}),
                  422, "image_base64")
    _assert_error(client.post("/v1/detect", content=b"raw", headers={"content-type": "text/plain"}), 415, "multipart")
    _assert_error(client.post("/v1/detect", files={"other": ("a.png", image_bytes(), "image/png")}), 422, "'image'")


def test_detect_upload_limits_are_413(home):
    with make_client(home, max_upload_bytes=50_000, max_image_pixels=100 * 100) as c:
        big = b"\x00" * 60_000
        _assert_error(c.post("/v1/detect", files={"image": ("a.png", big, "image/png")}), 413, "limit")
        _assert_error(c.post("/v1/detect", json={"image_base64": base64.b64encode(big).decode()}), 413, "limit")
        # a body far above the route's bound is refused from Content-Length alone
        huge = b"\x00" * 200_000
        _assert_error(c.post("/v1/detect", files={"image": ("a.png", huge, "image/png")}), 413, "larger than")
        # decompression bomb: tiny file, too many pixels; refused from the header
        buf = io.BytesIO()
        Image.new("RGB", (4000, 4000)).save(buf, format="PNG")
        assert len(buf.getvalue()) < 50_000
        _assert_error(c.post("/v1/detect", files={"image": ("bomb.png", buf.getvalue(), "image/png")}), 413, "pixels")
        assert c.post("/v1/detect", files={"image": ("ok.png", image_bytes(100, 100), "image/png")}).status_code == 200


def test_detect_concurrency_limit_is_429(home):
    gate = threading.Event()
    with make_client(home, loader=lambda p: FakeDetector(p, gate=gate), max_concurrent_inference=1) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, what="ready")
        results = {}
        t = threading.Thread(target=lambda: results.setdefault(
            "first", c.post("/v1/detect", files={"image": ("a.png", image_bytes(), "image/png")})))
        t.start()
        wait_for(lambda: c.app.state.limiter.in_flight == 1, 10, what="first request in flight")
        _assert_error(c.post("/v1/detect", files={"image": ("a.png", image_bytes(), "image/png")}), 429, "limit 1")
        gate.set()
        t.join(10)
        assert results["first"].status_code == 200
        assert c.app.state.limiter.in_flight == 0
        assert c.post("/v1/detect", files={"image": ("a.png", image_bytes(), "image/png")}).status_code == 200
        assert 'glasses_vision_rejected_requests_total{reason="concurrency"} 1' in c.get("/metrics").text


def test_loading_a_model_does_not_block_other_requests(home):
    register_dummy_model(home, "slow-model")
    gate = threading.Event()

    def loader(path):
        if "slow-model" in str(path):
            gate.wait(10)
        return FakeDetector(path)

    with make_client(home, loader=loader) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, what="ready")
        slow = {}
        t = threading.Thread(target=lambda: slow.setdefault("r", c.post(
            "/v1/detect?model=slow-model", files={"image": ("a.png", image_bytes(), "image/png")})))
        t.start()
        time.sleep(0.2)
        start = time.monotonic()
        fast = c.post("/v1/detect", files={"image": ("a.png", image_bytes(), "image/png")})
        assert fast.status_code == 200 and time.monotonic() - start < 2.0 and t.is_alive()
        assert c.get("/v1/models").status_code == 200
        gate.set()
        t.join(10)
        assert slow["r"].status_code == 200 and slow["r"].json()["model"] == "slow-model"


def test_sessions_are_loaded_once_and_reused(home):
    loads = []

    def loader(path):
        loads.append(path)
        return FakeDetector(path)

    with make_client(home, loader=loader) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, what="ready")
        for _ in range(5):
            assert c.post("/v1/detect", files={"image": ("a.png", image_bytes(), "image/png")}).status_code == 200
    assert len(loads) == 1


def test_inference_can_require_the_key(home):
    with make_client(home, inference_requires_key=True) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, what="ready")
        files = {"image": ("a.png", image_bytes(), "image/png")}
        _assert_error(c.post("/v1/detect", files=files), 401, "X-API-Key")
        _assert_error(c.post("/v1/detect", files=files, headers={"X-API-Key": "nope"}), 401, "wrong")
        assert c.post("/v1/detect", files=files, headers=AUTH).status_code == 200


# ---------------------------------------------------------------- models
def test_models_list_get_delete(client, home):
    register_dummy_model(home, "kitchen-v1", classes=["cup"], job_id="job-1", metrics={"map50": 0.5})
    listing = client.get("/v1/models").json()
    assert listing["default_model"] == DEFAULT_MODEL_ID
    ids = {m["id"]: m for m in listing["models"]}
    assert set(ids) == {DEFAULT_MODEL_ID, "kitchen-v1"} and ids[DEFAULT_MODEL_ID]["default"]
    one = client.get("/v1/models/kitchen-v1").json()
    assert one["metrics"] == {"map50": 0.5} and one["job_id"] == "job-1" and one["size_bytes"] > 0
    assert "path" not in one
    _assert_error(client.get("/v1/models/nope"), 404, "nope")
    # deleting needs the key, and without it nothing happens
    _assert_error(client.delete("/v1/models/kitchen-v1"), 401, "missing")
    _assert_error(client.delete("/v1/models/kitchen-v1", headers={"X-API-Key": "bad"}), 401, "wrong")
    assert client.get("/v1/models/kitchen-v1").status_code == 200
    _assert_error(client.delete(f"/v1/models/{DEFAULT_MODEL_ID}", headers=AUTH), 409, "default model")
    _assert_error(client.delete("/v1/models/nope", headers=AUTH), 404, "nope")
    assert client.delete("/v1/models/kitchen-v1", headers=AUTH).json() == {"id": "kitchen-v1", "deleted": True}
    _assert_error(client.get("/v1/models/kitchen-v1"), 404)
    assert not (home / "models" / "kitchen-v1").exists()


def test_unknown_route_and_method_are_json(client):
    _assert_error(client.get("/v2/nothing"), 404, "/docs")
    _assert_error(client.put("/v1/detect"), 405, "PUT")


# ---------------------------------------------------------------- jobs (submission and control; running: test_service_real)
@pytest.fixture
def data_root(home):
    root = home / "data"
    (root / "kitchen" / "images").mkdir(parents=True)
    (root / "kitchen" / "data.yaml").write_text("train: images\nval: images\nnames: [cup]\n")
    return root


def _job(**overrides):
    spec = {"dataset": "kitchen", "peft": "none", "optimizer": "adamw", "steps": 3, "imgsz": 64, "batch": 2}
    spec.update(overrides)
    return spec


def test_jobs_need_the_key_and_nothing_happens_without_it(client, data_root):
    for headers in ({}, {"X-API-Key": "wrong"}):
        _assert_error(client.post("/v1/jobs", json=_job(), headers=headers), 401)
        _assert_error(client.get("/v1/jobs", headers=headers), 401)
        _assert_error(client.get("/v1/jobs/job-x", headers=headers), 401)
        _assert_error(client.get("/v1/jobs/job-x/logs", headers=headers), 401)
        _assert_error(client.post("/v1/jobs/job-x/cancel", headers=headers), 401)
        _assert_error(client.post("/v1/jobs/job-x/resume", headers=headers), 401)
        _assert_error(client.post("/v1/jobs", files={"dataset": ("d.zip", yolo_zip(), "application/zip")},
                                  headers=headers), 401)
    assert client.get("/v1/jobs", headers=AUTH).json() == {"jobs": []}
    assert not (data_root.parent / "jobs").exists() or not any((data_root.parent / "jobs").iterdir())


def test_submit_list_get_logs_cancel_resume(client, home, data_root):
    resp = client.post("/v1/jobs", json=_job(name="k1", model_id="kitchen-v1"), headers=AUTH)
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["state"] == "queued" and job["name"] == "k1" and resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["spec"]["steps"] == 3 and "data_yaml" not in job["spec"]
    listed = client.get("/v1/jobs", headers=AUTH).json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]]
    assert client.get("/v1/jobs?state=queued", headers=AUTH).json()["jobs"][0]["id"] == job["id"]
    assert client.get("/v1/jobs?state=running", headers=AUTH).json()["jobs"] == []
    _assert_error(client.get("/v1/jobs?state=bogus", headers=AUTH), 422, "queued")
    assert client.get(f"/v1/jobs?offset={2**63 - 1}", headers=AUTH).json()["jobs"] == []
    assert client.get(f"/v1/jobs?offset={2**63}", headers=AUTH).status_code == 422  # was a 500 (SQLite overflow)
    assert client.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["id"] == job["id"]
    assert client.get(f"/v1/jobs/{job['id']}/logs", headers=AUTH).json() == {"id": job["id"], "lines": [], "total_lines": 0}
    _assert_error(client.get("/v1/jobs/job-none", headers=AUTH), 404, "job-none")
    _assert_error(client.get("/v1/jobs/job-none/logs", headers=AUTH), 404)
    _assert_error(client.post("/v1/jobs/job-none/cancel", headers=AUTH), 404)
    _assert_error(client.post("/v1/jobs/job-none/resume", headers=AUTH), 404)
    _assert_error(client.post(f"/v1/jobs/{job['id']}/resume", headers=AUTH), 409, "queued")
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH).json()
    assert cancelled["state"] == "cancelled"
    _assert_error(client.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH), 409, "already cancelled")
    # an interrupted job (the server went down while it ran) can be resumed
    store = client.app.state.store
    other = client.post("/v1/jobs", json=_job(), headers=AUTH).json()
    store.claim_next(worker_pid=4242)
    store.mark_interrupted(reason="test")
    resumed = client.post(f"/v1/jobs/{other['id']}/resume", headers=AUTH).json()
    assert resumed["state"] == "queued" and store.get(other["id"]).resume


@pytest.mark.parametrize("spec, status, words", [
    (_job(dataset="../outside"), 422, ["'..'"]),
    (_job(dataset="/etc"), 422, ["outside the data root"]),
    (_job(dataset="missing"), 422, ["does not exist"]),
    (_job(dataset=None), 422, ["dataset"]),
    (_job(imgsz=100), 422, ["multiple of 32"]),
    (_job(steps=0), 422, ["steps"]),
    (_job(optimizer="sgd-magic"), 422, ["unknown optimizer", "coap"]),
    (_job(base_model="resnet50"), 422, ["unknown base_model", DEFAULT_MODEL_ID]),
    (_job(model_id="../x"), 422, ["model id"]),
    (_job(unknown_field=1), 422, ["unknown_field"]),
    (_job(train_settings={"out": "/tmp/x"}), 422, ["may not set out"]),
    (_job(train_settings={"warp_speed": 9}), 422, ["warp_speed"]),
    (_job(lr=-1), 422, ["lr"]),
])
def test_bad_job_specs_are_refused(client, data_root, spec, status, words):
    spec = {k: v for k, v in spec.items() if v is not None}
    _assert_error(client.post("/v1/jobs", json=spec, headers=AUTH), status, *words)
    assert client.get("/v1/jobs", headers=AUTH).json()["jobs"] == []


def test_dataset_symlink_out_of_the_root_is_refused(client, data_root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.yaml").write_text("train: .\nval: .\nnames: [x]\n")
    (data_root / "sneaky").symlink_to(outside)
    _assert_error(client.post("/v1/jobs", json=_job(dataset="sneaky"), headers=AUTH), 422, "outside the data root")


def test_duplicate_model_id_is_409(client, data_root):
    _assert_error(client.post("/v1/jobs", json=_job(model_id=DEFAULT_MODEL_ID), headers=AUTH), 409, "already registered")


def test_zip_upload_job(client, home):
    resp = client.post("/v1/jobs", headers=AUTH, files={"dataset": ("d.zip", yolo_zip(), "application/zip")},
                       data={"spec": json.dumps({"peft": "none", "steps": 2, "imgsz": 64})})
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["id"]
    job = client.app.state.store.get(job_id)
    assert job.spec["uploaded_dataset"] and (home / "jobs" / job_id / "dataset" / "data.yaml").is_file()
    assert not (home / "jobs" / job_id / "upload.zip").exists()


@pytest.mark.parametrize("files, data, status, words", [
    ({"dataset": ("d.zip", b"not a zip", "application/zip")}, {}, 415, ["not a zip"]),
    ({"dataset": ("d.zip", yolo_zip(yaml_text="train: ../../../etc\nval: images/val\nnames: [a]\n"), "application/zip")},
     {}, 422, ["outside"]),
    ({"dataset": ("d.zip", yolo_zip(), "application/zip")}, {"spec": "{not json"}, 422, ["invalid job"]),
    ({"dataset": ("d.zip", yolo_zip(), "application/zip")}, {"spec": json.dumps({"dataset": "kitchen"})}, 422,
     ["not both"]),
    ({"other": ("d.zip", yolo_zip(), "application/zip")}, {}, 422, ["'dataset'"]),
])
def test_bad_zip_uploads_are_refused_and_leave_nothing(client, home, files, data, status, words):
    _assert_error(client.post("/v1/jobs", headers=AUTH, files=files, data=data), status, *words)
    assert client.get("/v1/jobs", headers=AUTH).json()["jobs"] == []
    assert not (home / "jobs").exists() or list((home / "jobs").iterdir()) == []


def test_zip_upload_size_limit_is_413(home):
    with make_client(home, max_dataset_zip_bytes=2_000) as c:
        resp = c.post("/v1/jobs", headers=AUTH, files={"dataset": ("d.zip", yolo_zip(n_images=4), "application/zip")})
        _assert_error(resp, 413)


def test_job_submission_wrong_content_type_is_415(client):
    _assert_error(client.post("/v1/jobs", content=b"x", headers={**AUTH, "content-type": "text/plain"}), 415,
                  "application/json")


def test_settings_from_env(tmp_path):
    env = {"GLASSES_VISION_HOME": str(tmp_path), "GLASSES_VISION_API_KEYS": "a, b",
           "GLASSES_VISION_MAX_UPLOAD_BYTES": "123", "GLASSES_VISION_INFERENCE_REQUIRES_KEY": "true"}
    s = Settings.from_env(env, port=9000)
    assert s.home == tmp_path and s.api_keys == ["a", "b"] and s.max_upload_bytes == 123
    assert s.inference_requires_key and s.port == 9000 and s.resolved_data_root == (tmp_path / "data").resolve()
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match="GLASSES_VISION_"):
        Settings.from_env({"GLASSES_VISION_MAX_UPLOAD_BYTES": "lots"})


def test_api_key_is_generated_once_when_none_is_configured(tmp_path):
    from service.core.security import load_api_keys

    s = Settings(home=tmp_path)
    first = load_api_keys(s)
    assert len(first[0]) > 20 and load_api_keys(s) == first
    assert (tmp_path / "api_key").stat().st_mode & 0o777 == 0o600
    assert API_KEY not in first


def test_a_model_that_cannot_load_or_run_is_409_not_500(home):
    register_dummy_model(home, "broken")
    register_dummy_model(home, "crashes")

    class Crashes(FakeDetector):
        def detect(self, image, conf=0.25, iou=0.45, max_det=300):
            raise RuntimeError("onnxruntime said no")

    def loader(path):
        if "broken" in str(path):
            raise RuntimeError("INVALID_PROTOBUF")
        return Crashes(path) if "crashes" in str(path) else FakeDetector(path)

    with make_client(home, loader=loader) as c:
        files = {"image": ("a.png", image_bytes(), "image/png")}
        _assert_error(c.post("/v1/detect?model=broken", files=files), 409, "cannot be loaded", "INVALID_PROTOBUF")
        _assert_error(c.post("/v1/detect?model=crashes", files=files), 409, "failed on this image")
        (home / "models" / "broken" / "model.json").write_text("{oops")
        _assert_error(c.get("/v1/models/broken"), 400, "unreadable")
        assert "broken" not in [m["id"] for m in c.get("/v1/models").json()["models"]]
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, what="ready")
        assert c.post("/v1/detect", files=files).status_code == 200


def test_garbage_never_gets_a_500(client, data_root):
    bodies = [
        {"content": b"", "headers": {}},
        {"content": b"\xff\xfe\x00garbage", "headers": {"content-type": "application/json"}},
        {"content": b"[1, 2, 3]", "headers": {"content-type": "application/json"}},
        {"content": b"null", "headers": {"content-type": "application/json"}},
        {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}},
        {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        {"content": b"a=b", "headers": {"content-type": "application/x-www-form-urlencoded"}},
    ]
    targets = [("POST", "/v1/detect"), ("POST", "/v1/detect?model=%00"), ("POST", "/v1/jobs"),
               ("GET", "/v1/models/%2e%2e"), ("DELETE", "/v1/models/%2e%2e"), ("GET", "/v1/jobs/%00"),
               ("POST", "/v1/jobs/x/cancel"), ("GET", "/v1/jobs?limit=-1"), ("GET", "/v1/jobs/x/logs?tail=0")]
    for method, path in targets:
        for body in bodies:
            resp = client.request(method, path, headers={**AUTH, **body["headers"]}, content=body["content"])
            assert 400 <= resp.status_code < 500, (method, path, body, resp.status_code, resp.text)
            assert set(resp.json()) == {"error", "message"}
    files = {"image": ("a.png", image_bytes(), "image/png"), "image2": ("b.png", image_bytes(), "image/png")}
    resp = client.post("/v1/detect", files=files)
    assert 400 <= resp.status_code < 500 and resp.json()["message"]


def test_corrupt_upload_after_ultralytics_patched_pil_is_not_500(client):
    """Regression: ultralytics wraps PIL's Image.open with a pip-installing fallback; uploads must bypass it."""
    import ultralytics.utils.patches  # noqa: F401 - installs the wrapper

    _assert_error(client.post("/v1/detect", files={"image": ("x.jpg", b"definitely not an image", "image/jpeg")}),
                  415, "JPEG")


def test_in_flight_limiter_takes_a_free_slot_at_once_queues_then_refuses():
    import asyncio

    from service.core.errors import NotReadyError, TooManyRequestsError
    from service.core.inference import InFlightLimiter

    async def main():
        limiter = InFlightLimiter(limit=1, queue=1, timeout=0.2)
        rejected = []
        order = []

        async def hold(name: str, seconds: float):
            async with limiter.slot(on_reject=lambda: rejected.append(name)):
                order.append(name)
                await asyncio.sleep(seconds)

        first = asyncio.ensure_future(hold("first", 0.1))
        await asyncio.sleep(0)  # the free slot is taken without waiting
        assert limiter.in_flight == 1 and limiter.waiting == 0 and order == ["first"]
        second = asyncio.ensure_future(hold("second", 0.0))  # queued behind it
        await asyncio.sleep(0.01)
        assert limiter.waiting == 1
        try:
            await hold("third", 0.0)  # the queue is full: refused at once
        except TooManyRequestsError:
            pass
        await asyncio.gather(first, second)
        slow = asyncio.ensure_future(hold("slow", 1.0))
        await asyncio.sleep(0)
        try:
            await hold("late", 0.0)  # waits 0.2 s for a slot, then 503
        except NotReadyError:
            pass
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        return order, rejected, limiter.in_flight, limiter.waiting

    order, rejected, in_flight, waiting = asyncio.run(main())
    assert order == ["first", "second", "slow"] and rejected == ["third", "late"] and (in_flight, waiting) == (0, 0)
