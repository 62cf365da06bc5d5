"""The service on its real path: export.runtime.Detector on an exported ONNX, real uvicorn on loopback,
job worker processes running a real (tiny) fine-tuning job from submit to a registered, queryable model."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.core.config import DEFAULT_MODEL_ID
from service.core.images import decode_image
from service.main import create_app
from tests.helpers.service import AUTH, image_bytes, make_settings, register_dummy_model, running_server, wait_for

IMGSZ = 64
NAMES = ["cup", "bottle", "phone", "book", "keyboard", "food_label"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A YOLO11n at 64 px, saved as a plain model dir (what the recipe's merged/ holds)."""
    import torch

    from models.detection import DetectionModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    DetectionModel("yolo11n", names=NAMES, imgsz=IMGSZ).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model_dir, tmp_path_factory) -> Path:
    from export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(tiny_model_dir, out, imgsz=IMGSZ, verify=False)  # verification is covered by the export tests
    return out


def _boxes(dets) -> np.ndarray:
    return np.asarray([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in dets], dtype=np.float64).reshape(-1, 4)


def test_http_boxes_equal_the_runtime(home, tiny_onnx):
    from export.runtime import Detector

    register_dummy_model(home, DEFAULT_MODEL_ID, onnx_file=tiny_onnx, classes=NAMES, imgsz=IMGSZ)
    frame = image_bytes(97, 71, fmt="PNG", seed=3)  # odd, non-square: letterbox padding on both axes
    expected = Detector(tiny_onnx).detect(decode_image(frame, 10**7, 10**8), conf=0.0001, iou=0.7, max_det=50)
    assert expected, "the tiny model should give some low-score boxes at conf=0.001"
    with TestClient(create_app(make_settings(home))) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 30, what="ready")
        body = c.post("/v1/detect?conf=0.0001&iou=0.7&max_det=50", files={"image": ("f.png", frame, "image/png")}).json()
    assert body["image"] == {"width": 97, "height": 71}
    np.testing.assert_allclose(_boxes(body["detections"]), np.asarray([d.box for d in expected]), atol=1e-4)
    assert [d["class_name"] for d in body["detections"]] == [d.class_name for d in expected]
    np.testing.assert_allclose([d["score"] for d in body["detections"]], [d.score for d in expected], atol=1e-6)
    assert all(0 <= d["x1"] <= d["x2"] <= 97 and 0 <= d["y1"] <= d["y2"] <= 71 for d in body["detections"])


def _job_state(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()


@pytest.mark.slow
def test_uvicorn_end_to_end(home, tiny_onnx):
    """Real uvicorn + httpx: 20 concurrent detects; jobs: cancel, a worker crash, a real job to a served model."""
    from training.data.synthetic import generate_dataset

    register_dummy_model(home, DEFAULT_MODEL_ID, onnx_file=tiny_onnx, classes=NAMES, imgsz=IMGSZ)
    generate_dataset(home / "data" / "ego", domain="egocentric", n=8, imgsz=IMGSZ, seed=0, val_fraction=0.25)
    settings = make_settings(home, job_workers=1, max_concurrent_inference=32, worker_poll_seconds=0.2)
    app = create_app(settings)
    with running_server(app) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 30, interval=0.2, what="ready")

        # 20 concurrent detects over real HTTP: all answered, all the same boxes
        frame = image_bytes(120, 90, fmt="JPEG", seed=1)
        with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=20)) as client:
            def detect(_):
                return client.post("/v1/detect?conf=0.001&max_det=20", files={"image": ("f.jpg", frame, "image/jpeg")})

            with ThreadPoolExecutor(20) as pool:
                responses = list(pool.map(detect, range(20)))
        assert [r.status_code for r in responses] == [200] * 20
        first = responses[0].json()["detections"]
        assert first and all(r.json()["detections"] == first for r in responses)

        # a small real job: generated data, 2 steps, LoRA when the PEFT package offers it
        peft = "lora" if _has_lora() else "none"
        spec = {"name": "ego-e2e", "dataset": "ego", "base_model": "yolo11n", "peft": peft, "steps": 2,
                "imgsz": IMGSZ, "batch": 2, "model_id": "ego-e2e"}
        resp = httpx.post(f"{url}/v1/jobs", json=spec, headers=AUTH, timeout=180)  # the first job waits for the checker
        assert resp.status_code == 201, resp.text
        c = resp.json()["id"]
        done = wait_for(lambda: (lambda j: j if j["state"] not in ("queued", "running") else None)(_job_state(url, c)),
                        150, interval=0.5, what="the job to finish")
        logs = httpx.get(f"{url}/v1/jobs/{c}/logs", headers=AUTH).json()["lines"]
        assert done["state"] == "succeeded", (done, logs[-20:])
        assert done["model_id"] == "ego-e2e" and done["progress"] == 1.0 and done["step"] == 2
        assert "map50" in done["metrics"] and done["memory"]["total"] > 0
        assert any("registered model ego-e2e" in line for line in logs)

        model = httpx.get(f"{url}/v1/models/ego-e2e").json()
        assert model["job_id"] == c and model["classes"] == NAMES and model["size_bytes"] > 0
        assert "map50" in model["metrics"] and model["verification"]["passed"]
        r = httpx.post(f"{url}/v1/detect?model=ego-e2e&conf=0.001", files={"image": ("f.jpg", frame, "image/jpeg")})
        assert r.status_code == 200 and r.json()["model"] == "ego-e2e"

        # a worker dying mid-job (think OOM kill) fails that job; the API keeps serving; a new worker takes over
        long_job = {"dataset": "ego", "base_model": "yolo11n", "peft": "none", "steps": 5000, "imgsz": IMGSZ,
                    "batch": 2, "train_settings": {"eval_every": 0, "log_every": 1}}
        b = httpx.post(f"{url}/v1/jobs", json=long_job, headers=AUTH, timeout=60).json()["id"]
        wait_for(lambda: _job_state(url, b)["step"] >= 1, 60, interval=0.2, what="job b running")
        pid = app.state.supervisor.pids()[0]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _job_state(url, b)["state"] == "failed", 30, interval=0.2, what="job b failed")
        assert "exited with code -9" in _job_state(url, b)["error"]
        assert httpx.post(f"{url}/v1/detect", files={"image": ("f.jpg", frame, "image/jpeg")}).status_code == 200
        wait_for(lambda: app.state.supervisor.pids() and app.state.supervisor.pids()[0] != pid, 30, what="new worker")
        assert httpx.get(f"{url}/healthz").json()["job_workers_alive"] == 1

        metrics = httpx.get(f"{url}/metrics").text
        assert 'glasses_vision_jobs{state="succeeded"} 1' in metrics and 'glasses_vision_jobs{state="failed"} 1' in metrics
        assert 'route="/v1/detect",status="200"} 22' in metrics


@pytest.mark.slow
def test_glasses_vision_serve_command(home, tiny_model_dir):
    """The CLI entry point on a fresh home: exports the default model on first start (cached in the registry),
    serves it on loopback, stops cleanly on Ctrl-C."""
    import subprocess
    import sys

    from tests.helpers.service import API_KEY, free_port

    port = free_port()
    env = dict(os.environ, GLASSES_VISION_API_KEYS=API_KEY, GLASSES_VISION_DEFAULT_MODEL_SOURCE=str(tiny_model_dir),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--home", str(home), "--port", str(port), "--workers", "0",
         "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        wait_for(ready, 120, interval=0.3, what="glasses-vision serve to export the default model and become ready")
        record = httpx.get(f"{url}/v1/models/{DEFAULT_MODEL_ID}").json()
        assert record["classes"] == NAMES and record["imgsz"] == IMGSZ and record["verification"]
        assert (home / "models" / DEFAULT_MODEL_ID / "model.onnx").is_file()
        r = httpx.post(f"{url}/v1/detect", files={"image": ("f.png", image_bytes(), "image/png")})
        assert r.status_code == 200 and r.json()["model"] == DEFAULT_MODEL_ID
        assert httpx.get(f"{url}/v1/jobs").status_code == 401
        assert httpx.get(f"{url}/v1/jobs", headers=AUTH).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"serving on http://127.0.0.1:{port}" in out


def _has_lora() -> bool:
    try:
        from service.layers.peft import list_peft_methods
    except ImportError:
        return False
    return "lora" in list_peft_methods()

