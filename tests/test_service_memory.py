"""Finding 2 of the service audit, measured: peak RSS of a live server (real uvicorn, real onnxruntime Detector)
under 8 concurrent worst-case uploads stays <= 1.5 x idle + 300 MiB, and RSS returns to within 10 % of idle."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.helpers.service import free_port, wait_for

IMGSZ = 320
NAMES = ["cup"]

_SERVER = r"""
import sys, uvicorn
from pathlib import Path
from service.core.config import Settings
from service.main import create_app
from service.registry import ModelRegistry
home, onnx, port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ModelRegistry(home / "models").register("glasses-base-yolo11n", onnx, classes=["cup"], imgsz=320)
# a loaded CI machine must not turn the measurement into 503s: wait as long as it takes
app = create_app(Settings(home=home, api_keys=["k"], job_workers=0, inference_threads=1, inference_queue_timeout_s=300))
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def write_constant_detector(path: Path, imgsz: int = IMGSZ) -> None:
    """A valid exported-detector file whose network answers a constant (no torch needed): the service's
    memory is in decoding and pre-processing, which this exercises exactly as a real model does."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.metadata import build_metadata

    anchors = sum((imgsz // s) ** 2 for s in (8, 16, 32))
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, imgsz, imgsz])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + len(NAMES), anchors])
    const = numpy_helper.from_array(np.zeros((1, 4 + len(NAMES), anchors), np.float32), "const")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    axes = numpy_helper.from_array(np.array([1, 2], np.int64), "axes")
    # one row per frame of the batch (the service batches concurrent frames): (B,) -> (B, 1, 1) + const
    nodes = [helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["m3", "zero"], ["z"]),
             helper.make_node("Add", ["const", "z"], ["output0"])]
    graph = helper.make_graph(nodes, "constant", [x], [y], initializer=[const, zero, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = build_metadata(names=NAMES, stride=[8, 16, 32], imgsz=(imgsz, imgsz), anchors=anchors, source="test",
                          source_sha256="0" * 64, opset=17)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def _rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


@pytest.mark.slow
def test_02_peak_rss_under_8_concurrent_worst_case_uploads(tmp_path):
    onnx_file = tmp_path / "constant.onnx"
    write_constant_detector(onnx_file)
    worst = io.BytesIO()
    Image.new("RGB", (4032, 3024)).save(worst, format="PNG")  # the largest frame the default limit admits
    bomb = io.BytesIO()
    Image.new("L", (6300, 6300)).save(bomb, format="PNG")  # the audit's 6300x6300 zero PNG
    small = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 60, 30)).save(small, format="JPEG")
    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(tmp_path / "home"), str(onnx_file), str(port)],
                            cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url), 60, interval=0.2, what="server ready")
        with httpx.Client(timeout=60) as client:
            for _ in range(5):  # warm-up: the session's first runs allocate its arenas
                assert client.post(f"{url}/v1/detect", files={"image": ("s.jpg", small.getvalue())}).status_code == 200
            time.sleep(0.5)
            idle = _rss(proc.pid)
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to now

            def send(data: bytes) -> int:
                return client.post(f"{url}/v1/detect", files={"image": ("w.png", data)}).status_code

            t0 = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(send, [worst.getvalue()] * 8))
                bomb_codes = list(pool.map(send, [bomb.getvalue()] * 8))
            seconds = time.monotonic() - t0
            peak = _rss(proc.pid, "VmHWM")
            time.sleep(1.0)
            after = _rss(proc.pid)
        mib = 1024 * 1024
        report = {"idle_mib": round(idle / mib, 1), "peak_mib": round(peak / mib, 1),
                  "after_mib": round(after / mib, 1), "burst_s": round(seconds, 2), "codes": codes,
                  "bomb_codes": bomb_codes}
        print(json.dumps(report))
        assert codes == [200] * 8 and bomb_codes == [413] * 8, report
        assert peak <= 1.5 * idle + 300 * mib, report
        assert after <= 1.10 * idle, report
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_load_20_clients_x_50_detects_keeps_rss_flat(tmp_path):
    """20 concurrent clients x 50 detects: no errors but documented 429/503, RSS at request 1000 at most 10 % above
    its value at request 200 (after the warm-up the session's arenas are allocated and reused). A leak grows; RSS may
    fall (a sample at 200 taken while many frames were in flight, freed by the end: 142 -> 124 MiB in one CI run)."""
    import threading

    onnx_file = tmp_path / "constant.onnx"
    write_constant_detector(onnx_file)
    frame = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 60, 30)).save(frame, format="JPEG")
    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(tmp_path / "home"), str(onnx_file), str(port)],
                            cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    url = f"http://127.0.0.1:{port}"
    lock, done, samples, codes = threading.Lock(), [0], {}, []
    try:
        wait_for(lambda: _ready(url), 60, interval=0.2, what="server ready")

        def client_run(_):
            with httpx.Client(timeout=60) as client:
                for _ in range(50):
                    r = client.post(f"{url}/v1/detect", files={"image": ("f.jpg", frame.getvalue())})
                    with lock:
                        codes.append(r.status_code)
                        done[0] += 1
                        if done[0] in (200, 1000):
                            samples[done[0]] = _rss(proc.pid)

        t0 = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(client_run, range(20)))
        seconds = time.monotonic() - t0
        mib = 1024 * 1024
        report = {"requests": len(codes), "ok": codes.count(200), "other": sorted(set(codes) - {200}),
                  "rss_200_mib": round(samples[200] / mib, 1), "rss_1000_mib": round(samples[1000] / mib, 1),
                  "seconds": round(seconds, 1)}
        print(json.dumps(report))
        assert len(codes) == 1000 and set(codes) <= {200, 429, 503}, report
        assert samples[1000] - samples[200] <= 0.10 * samples[200], report
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
