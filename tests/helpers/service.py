"""Service test helpers: settings, a fake detector, registered dummy models, zips, a real uvicorn server, polling."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
from PIL import Image

from service.core.config import Settings

API_KEY = "test-key-0123456789"
AUTH = {"X-API-Key": API_KEY}

FakeDetection = namedtuple("FakeDetection", "box score class_id class_name")


class FakeDetector:
    """Stands in for export.runtime.Detector in HTTP-layer tests: one box inset 1 px from the frame's edges."""

    def __init__(self, path: Path, delay: float = 0.0, gate: threading.Event | None = None):
        self.path, self.delay, self.gate = path, delay, gate
        self.calls = 0

    def detect(self, image, conf=0.25, iou=0.45, max_det=300):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        h, w = image.shape[:2]
        dets = [FakeDetection(np.array([1.0, 1.0, w - 1.0, h - 1.0]), 0.9, 0, "thing")]
        return [d for d in dets if d.score >= conf][:max_det]


def make_settings(home: Path, **overrides) -> Settings:
    # no detect queue in tests unless asked: a request beyond max_concurrent_inference is refused (429) at once
    values = dict(home=home, api_keys=[API_KEY], job_workers=0, inference_threads=1, inference_queue=0)
    values.update(overrides)
    return Settings(**values)


def register_dummy_model(home: Path, model_id: str, onnx_file: Path | None = None, **meta) -> None:
    """Put a model in the registry; without ``onnx_file`` a tiny valid ONNX graph (identity) is used."""
    from service.registry import ModelRegistry

    if onnx_file is None:
        onnx_file = home / f"{model_id}-identity.onnx"
        _write_identity_onnx(onnx_file)
    ModelRegistry(home / "models").register(model_id, onnx_file, **meta)


def _write_identity_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 32, 32])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def image_bytes(width: int = 64, height: int = 48, fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def zip_bytes(entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)
    return buf.getvalue()


def yolo_zip(n_images: int = 2, yaml_text: str | None = None, prefix: str = "") -> bytes:
    """A minimal YOLO-layout dataset as a zip."""
    entries = {}
    for split in ("train", "val"):
        for i in range(n_images):
            entries[f"{prefix}images/{split}/{i}.png"] = image_bytes(32, 32, seed=i)
            entries[f"{prefix}labels/{split}/{i}.txt"] = b"0 0.5 0.5 0.25 0.25\n"
    entries[f"{prefix}data.yaml"] = (yaml_text or "train: images/train\nval: images/val\nnames: [thing]\n").encode()
    return zip_bytes(entries)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, startup_timeout: float = 30.0):
    """Real uvicorn serving ``app`` on a free 127.0.0.1 port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=20)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def make_client(home: Path, loader=None, **overrides):
    """A TestClient on a service in ``home`` serving a dummy default model (``FakeDetector`` unless ``loader``)."""
    from fastapi.testclient import TestClient

    from service.core.config import DEFAULT_MODEL_ID
    from service.main import create_app

    register_dummy_model(home, DEFAULT_MODEL_ID, classes=["thing"], imgsz=64)
    app = create_app(make_settings(home, **overrides), detector_loader=loader or (lambda p: FakeDetector(p)))
    return TestClient(app, raise_server_exceptions=False)


def claimed_upload_job(store, worker_pid: int, model_id: str) -> tuple:
    """A new job on an uploaded dataset (no real files) and the same job as claimed by worker ``worker_pid``."""
    job = store.create({"request": {}, "data_yaml": "unused.yaml", "uploaded_dataset": True, "model_id": model_id})
    return job, store.claim_next(worker_pid=worker_pid)
