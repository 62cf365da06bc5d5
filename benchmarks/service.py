"""Detect throughput and latency over HTTP (loopback) next to calling the runtime in-process.

    python benchmarks/service.py                       # shipped base model, 320 px, concurrency 1 and 4
    python benchmarks/service.py --model-dir runs/kitchen/merged --requests 200 --out docs/benchmarks/service.md

The server is started as a child process (``glasses-vision serve``, no job workers) with the
model pre-registered, so its GIL and threads are its own. Both paths get the same JPEG frame:
the HTTP path uploads it (multipart) and the server decodes it; the in-process path decodes
it with the same function and calls ``export.runtime.Detector.detect`` on a session with the
same thread settings. Rounds interleave the two paths; medians over rounds are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _frame_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A synthetic egocentric frame if the data package is there, else a smooth random picture."""
    import io

    from PIL import Image

    try:
        from training.data.synthetic import render_sample

        arr = render_sample(seed, seed=seed, domain="egocentric", imgsz=max(width, height)).image[:height, :width]
    except ImportError:
        rng = np.random.default_rng(seed)
        small = rng.integers(0, 255, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _run_load(call, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []

    def one(_):
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(min(requests, 2 * concurrency))))  # warm-up
        latencies.clear()
        start = time.perf_counter()
        list(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    return {"throughput": requests / wall, "p50_ms": _percentile(latencies, 50) * 1e3,
            "p99_ms": _percentile(latencies, 99) * 1e3}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(home: Path, port: int, threads: int, concurrency_limit: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), GLASSES_VISION_INFERENCE_THREADS=str(threads),
               GLASSES_VISION_MAX_CONCURRENT_INFERENCE=str(concurrency_limit), GLASSES_VISION_API_KEYS="bench")
    cmd = [sys.executable, "-m", "service.cli", "serve", "--home", str(home), "--port", str(port), "--workers", "0",
           "--log-level", "warning"]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="model dir to export (default: the shipped base)")
    parser.add_argument("--onnx", default=None, help="an exported .onnx to serve instead of exporting")
    parser.add_argument("--imgsz", type=int, default=None, help="export input size (default: the model's)")
    parser.add_argument("--frame", default="640x480", help="WxH of the test frame")
    parser.add_argument("--requests", type=int, default=100, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per session (both paths)")
    parser.add_argument("--out", default=None, help="also write the results table (markdown) here")
    args = parser.parse_args(argv)

    import httpx

    from service.core.config import DEFAULT_MODEL_ID
    from service.core.images import decode_image
    from service.core.inference import runtime_loader
    from service.registry import ModelRegistry

    load_before = os.getloadavg()[0]
    width, height = (int(v) for v in args.frame.lower().split("x"))
    jpeg = _frame_jpeg(width, height)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        onnx = Path(args.onnx) if args.onnx else None
        if onnx is None:
            from export import export_onnx

            from service.jobs.bootstrap import SHIPPED_BASE_DIR

            onnx = Path(tmp) / "model.onnx"
            export_onnx(args.model_dir or SHIPPED_BASE_DIR, onnx, imgsz=args.imgsz)
        ModelRegistry(home / "models").register(DEFAULT_MODEL_ID, onnx, source="benchmark")

        detector = runtime_loader(args.threads)(onnx)
        max_c = max(args.concurrency)
        port = _free_port()
        server = _start_server(home, port, args.threads, max_c)
        url = f"http://127.0.0.1:{port}"
        try:
            client = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=max_c * 2))
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"server did not become ready: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)

            def http_call():
                r = client.post("/v1/detect", files={"image": ("frame.jpg", jpeg, "image/jpeg")})
                r.raise_for_status()

            def local_call():
                image = decode_image(jpeg, 10 * 1024 * 1024, 40_000_000)
                detector.detect(image, conf=0.25, iou=0.45, max_det=300)

            # same boxes on both paths, checked once
            image = decode_image(jpeg, 10 * 1024 * 1024, 40_000_000)
            local = [[float(v) for v in d.box] for d in detector.detect(image, conf=0.25, iou=0.45, max_det=300)]
            remote = client.post("/v1/detect", files={"image": ("f.jpg", jpeg, "image/jpeg")}).json()["detections"]
            assert np.allclose(np.asarray(local).reshape(-1, 4),
                               np.asarray([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in remote]).reshape(-1, 4),
                               atol=1e-3), "HTTP boxes differ from the runtime's"

            results: dict[tuple[str, int], list[dict]] = {}
            for _ in range(args.rounds):
                for c in args.concurrency:
                    for name, call in (("in-process", local_call), ("http", http_call)):
                        results.setdefault((name, c), []).append(_run_load(call, args.requests, c))
        finally:
            server.terminate()
            server.wait(timeout=30)

    def med(name, c, key):
        return statistics.median(r[key] for r in results[(name, c)])

    lines = [
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}, onnxruntime threads per session: {args.threads}; "
        f"frame {width}x{height} JPEG ({len(jpeg)} bytes), {args.requests} requests x {args.rounds} interleaved rounds, "
        f"medians. Load average (1 min) before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
        "(other processes share this machine).",
        "",
        "| concurrency | path | req/s | p50 ms | p99 ms | HTTP / in-process throughput |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    summary = {}
    for c in args.concurrency:
        ratio = med("http", c, "throughput") / med("in-process", c, "throughput")
        summary[c] = ratio
        for name in ("in-process", "http"):
            lines.append(
                f"| {c} | {name} | {med(name, c, 'throughput'):.1f} | {med(name, c, 'p50_ms'):.2f} | "
                f"{med(name, c, 'p99_ms'):.2f} | {f'{ratio:.2f}x' if name == 'http' else ''} |"
            )
    table = "\n".join(lines)
    print(table)
    print(json.dumps({"http_over_inprocess": summary}))
    if args.out:
        from models.io import atomic_write_text

        atomic_write_text(args.out, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
