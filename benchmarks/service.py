"""Detect throughput and latency over HTTP (loopback) next to calling the runtime in-process.

    python benchmarks/service.py                       # shipped base model, concurrency 1, 4 and 16
    python benchmarks/service.py --model-dir runs/kitchen/merged --requests 200 --out /tmp/service.md
    python benchmarks/service.py --profile /tmp/server-profile.txt   # also py-spy the server at concurrency 1

Two servers are started as child processes (``glasses-vision serve``, no job workers) with the
model (exported with a dynamic batch axis, as the service exports) pre-registered, so their GIL
and threads are their own: one with the default micro-batching settings, one with
``GLASSES_VISION_DETECT_BATCH_SIZE=1`` (no batching). Every path gets the same JPEG frame: the
HTTP paths send it as the raw body (``--body multipart`` for an upload form) and the server
decodes it; the in-process path decodes it with the same function and calls
``export.runtime.Detector.detect`` (one call per frame) on a session of the same file with the
same thread settings. Rounds interleave the paths; medians over rounds are reported.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
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


def _start_server(home: Path, port: int, threads: int, concurrency_limit: int, batch_size: int | None = None,
                  batch_wait_ms: float | None = None, batch_parallel: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), GLASSES_VISION_INFERENCE_THREADS=str(threads),
               GLASSES_VISION_MAX_CONCURRENT_INFERENCE=str(concurrency_limit), GLASSES_VISION_API_KEYS="bench")
    if batch_size is not None:
        env["GLASSES_VISION_DETECT_BATCH_SIZE"] = str(batch_size)
    if batch_wait_ms is not None:
        env["GLASSES_VISION_DETECT_BATCH_WAIT_MS"] = str(batch_wait_ms)
    if batch_parallel is not None:
        env["GLASSES_VISION_DETECT_BATCH_PARALLEL"] = str(batch_parallel)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--home", str(home), "--port", str(port), "--workers", "0",
           "--log-level", "warning"]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


_PROFILE_GROUPS = (  # (label, function names whose inclusive samples it counts), first match wins per sample
    ("onnxruntime Session.run", ("Session.run",)),
    ("image decode (PIL)", ("decode_upload",)),
    ("letterbox + input conversion", ("preprocess",)),
    ("postprocess (scores, NMS, boxes)", ("postprocess",)),
    ("thread hand-offs (wake a worker / wake the loop)", ("BaseEventLoop.call_soon_threadsafe",
                                                          "AsyncIOBackend.run_sync_in_worker_thread",
                                                          "run_in_threadpool")),
    ("multipart / JSON body parsing", ("Request._get_form", "Request.body", "_read_image_bytes")),
    ("HTTP parsing + writing (uvicorn h11)", ("H11Protocol.data_received", "RequestResponseCycle.send",
                                              "_SelectorSocketTransport.write")),
    ("FastAPI dependencies + query parameters", ("solve_dependencies",)),
    ("response serialisation", ("detect_json", "serialize_response", "jsonable_encoder")),
    ("middleware + routing (the rest of the request on the loop)", ("RequestResponseCycle.run_asgi",)),
)


def summarise_profile(raw_path: Path, requests: int, rate: int = 500) -> str:
    """py-spy ``--format raw`` samples (all threads) -> a markdown table: thread-ms per request by group.

    Idle worker threads (waiting for work) and the event loop waiting in epoll are left out.
    """
    counts: dict[str, int] = {}
    total = 0
    for line in raw_path.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        names = [frame.split(" (")[0] for frame in stack.split(";")]
        if names[-1] in ("EpollSelector.select", "Condition.wait") or "Queue.get" in names:
            continue  # idle: the loop waiting for sockets, a worker thread waiting for work
        total += int(n)
        label = "other"
        for group, keys in _PROFILE_GROUPS:
            if any(name in keys for name in names):
                label = group
                break
        counts[label] = counts.get(label, 0) + int(n)
    ms = 1000.0 / rate / max(requests, 1)
    lines = [f"py-spy {rate} samples/s over all server threads, {requests} sequential requests, idle samples left out: "
             f"{total * ms:.2f} ms of thread time per request (a thread waiting for the GIL counts).", "",
             "| where | ms per request | share |", "| --- | --- | --- |"]
    for label, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {label} | {n * ms:.2f} | {100.0 * n / max(total, 1):.0f}% |")
    return "\n".join(lines)


def _wait_ready(client, server, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit(f"server did not become ready: {server.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="model dir to export (default: the shipped base)")
    parser.add_argument("--onnx", default=None, help="an exported .onnx to serve instead of exporting")
    parser.add_argument("--imgsz", type=int, default=None, help="export input size (default: the model's)")
    parser.add_argument("--frame", default="640x480", help="WxH of the test frame")
    parser.add_argument("--requests", type=int, default=100, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per session (all paths)")
    parser.add_argument("--body", choices=("raw", "multipart"), default="raw", help="how HTTP requests carry the frame")
    parser.add_argument("--client", choices=("http.client", "httpx"), default="http.client",
                        help="HTTP client of the load threads: the standard library's (one keep-alive connection "
                        "per thread; about 0.1 ms of CPU per request here) or httpx (about 0.6 ms): the client "
                        "shares the machine with the server, its CPU is taken from the server's")
    parser.add_argument("--batch-size", type=int, default=None, help="the batching server's detect_batch_size "
                        "(default: the Settings default)")
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="its detect_batch_wait_ms (default: Settings)")
    parser.add_argument("--batch-parallel", type=int, default=None, help="its detect_batch_parallel (default: Settings)")
    parser.add_argument("--profile", default=None, help="also py-spy the batching server over --requests sequential "
                        "requests and write the breakdown (and the raw samples next to it)")
    parser.add_argument("--out", default=None, help="also write the results table (markdown) here")
    args = parser.parse_args(argv)

    import httpx

    from service.core.config import DEFAULT_MODEL_ID, Settings
    from service.core.images import decode_upload
    from service.core.inference import runtime_loader
    from service.registry import ModelRegistry

    load_before = os.getloadavg()[0]
    width, height = (int(v) for v in args.frame.lower().split("x"))
    jpeg = _frame_jpeg(width, height)
    defaults = Settings.model_fields
    batch_size = args.batch_size or defaults["detect_batch_size"].default
    batch_wait = args.batch_wait_ms if args.batch_wait_ms is not None else defaults["detect_batch_wait_ms"].default
    parallel = args.batch_parallel or (defaults["detect_batch_parallel"].default_factory()
                                       if "detect_batch_parallel" in defaults else 1)
    profile_text = None
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        onnx = Path(args.onnx) if args.onnx else None
        if onnx is None:
            from export import export_onnx

            from service.jobs.bootstrap import SHIPPED_BASE_DIR

            onnx = Path(tmp) / "model.onnx"
            export_onnx(args.model_dir or SHIPPED_BASE_DIR, onnx, imgsz=args.imgsz, dynamic_batch=True)
        ModelRegistry(home / "models").register(DEFAULT_MODEL_ID, onnx, source="benchmark")

        detector = runtime_loader(args.threads)(onnx)
        max_c = max(args.concurrency)
        servers: dict[str, subprocess.Popen] = {}
        clients: dict[str, httpx.Client] = {}
        try:
            for name, size in (("http batched", batch_size), ("http unbatched", 1)):
                port = _free_port()
                servers[name] = _start_server(home, port, args.threads, max_c, size, batch_wait, parallel)
                clients[name] = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                             limits=httpx.Limits(max_connections=max_c * 2))
            for name in servers:
                _wait_ready(clients[name], servers[name])

            if args.body == "raw":
                body, ctype = jpeg, "image/jpeg"
            else:
                boundary = "glassesvisionbench"
                body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"frame.jpg\"\r\n"
                        f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
                ctype = f"multipart/form-data; boundary={boundary}"
            local_conns = threading.local()

            def http_call(client) -> dict:
                if args.client == "httpx":
                    r = client.post("/v1/detect", content=body, headers={"content-type": ctype})
                    r.raise_for_status()
                    return r.json()
                conns = local_conns.__dict__.setdefault("conns", {})
                host, port = client.base_url.host, client.base_url.port
                conn = conns.get(port)
                if conn is None:
                    conn = conns[port] = http.client.HTTPConnection(host, port, timeout=60)
                try:
                    conn.request("POST", "/v1/detect", body=body, headers={"content-type": ctype})
                    resp = conn.getresponse()
                except (ConnectionError, http.client.HTTPException):  # the server closed an idle keep-alive connection
                    conn.close()
                    conn.request("POST", "/v1/detect", body=body, headers={"content-type": ctype})
                    resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
                return json.loads(data)

            target = max(detector.imgsz)

            def local_call():  # the server's decode (reduced to about the model's input), then one detect call
                image = decode_upload(jpeg, 10 * 1024 * 1024, 40_000_000, target)
                return image, detector.detect(image.rgb, conf=0.25, iou=0.45, max_det=300)

            # same boxes on every path, checked once
            image, found = local_call()
            sx, sy = image.scale
            local = np.asarray([[d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy] for d in found]).reshape(-1, 4)
            for name, client in clients.items():
                remote = http_call(client)["detections"]
                assert np.allclose(local, np.asarray([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in remote]).reshape(-1, 4),
                                   atol=1e-3), f"{name} boxes differ from the runtime's"

            paths = {"in-process": local_call}
            paths.update({name: (lambda c=client: http_call(c)) for name, client in clients.items()})
            results: dict[tuple[str, int], list[dict]] = {}
            loads: list[float] = []
            for _ in range(args.rounds):
                for c in args.concurrency:
                    for name, call in paths.items():
                        results.setdefault((name, c), []).append(_run_load(call, args.requests, c))
                loads.append(os.getloadavg()[0])

            if args.profile:
                raw_path = Path(args.profile).with_suffix(".raw.txt")
                spy = subprocess.Popen(["py-spy", "record", "-r", "500", "-f", "raw", "-o", str(raw_path), "-t", "--nonblocking",
                                        "-p", str(servers["http batched"].pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
                start = time.perf_counter()
                for _ in range(args.requests):
                    http_call(clients["http batched"])
                wall_ms = (time.perf_counter() - start) * 1000.0 / args.requests
                spy.send_signal(2)
                spy.wait(timeout=60)
                profile_text = summarise_profile(raw_path, args.requests)
                profile_text += f"\n\nWall time per request while profiled: {wall_ms:.2f} ms."
        finally:
            for server in servers.values():
                server.terminate()
            for server in servers.values():
                server.wait(timeout=30)

    def med(name, c, key):
        return statistics.median(r[key] for r in results[(name, c)])

    lines = [
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}, onnxruntime threads per session: {args.threads}; "
        f"frame {width}x{height} JPEG ({len(jpeg)} bytes) sent as {args.body} body by {args.client}, model input "
        f"{detector.imgsz[0]}x{detector.imgsz[1]}, {args.requests} requests x {args.rounds} interleaved rounds, medians; "
        f"batching server: detect_batch_size {batch_size}, detect_batch_wait_ms {batch_wait:g}, "
        f"detect_batch_parallel {parallel}. "
        f"Load average (1 min) before: {load_before:.2f}, after each round: "
        f"{', '.join(f'{v:.2f}' for v in loads)}.",
        "",
        "| concurrency | path | req/s | p50 ms | p99 ms | HTTP / in-process throughput |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    summary: dict[str, dict[int, float]] = {}
    for c in args.concurrency:
        base = med("in-process", c, "throughput")
        for name in paths:
            ratio = med(name, c, "throughput") / base
            if name != "in-process":
                summary.setdefault(name, {})[c] = round(ratio, 3)
            lines.append(
                f"| {c} | {name} | {med(name, c, 'throughput'):.1f} | {med(name, c, 'p50_ms'):.2f} | "
                f"{med(name, c, 'p99_ms'):.2f} | {f'{ratio:.2f}x' if name != 'in-process' else ''} |"
            )
    table = "\n".join(lines)
    print(table)
    print(json.dumps({"http_over_inprocess": summary}))
    if profile_text:
        print()
        print(profile_text)
        from models.io import atomic_write_text

        atomic_write_text(args.profile, profile_text + "\n")
    if args.out:
        from models.io import atomic_write_text

        atomic_write_text(args.out, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
