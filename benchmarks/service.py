"""Detect throughput and latency over HTTP (loopback) next to calling the runtime in-process.

    python benchmarks/service.py                       # shipped base model, concurrency 1, 4 and 16
    python benchmarks/service.py --model-dir runs/kitchen/merged --seconds 3 --out /tmp/service.md
    python benchmarks/service.py --profile /tmp/server-profile.txt   # also py-spy the server at concurrency 1

Two servers are started as child processes (``glasses-vision serve``, no job workers) with the
model (exported with a dynamic batch axis, as the service exports) pre-registered, so their GIL
and threads are their own: one with the default micro-batching settings, one with
``GLASSES_VISION_DETECT_BATCH_SIZE=1`` (no batching). Every path gets the same JPEG frame: the
HTTP paths send it as the raw body (``--body multipart`` for an upload form) and the server
decodes it; the in-process path decodes it with the same function and calls
``export.runtime.Detector.detect`` (one call per frame) on a session of the same file with the
same thread settings. Rounds interleave the paths; medians over rounds are reported.

The load client is ``wrk`` (C, one epoll thread, keep-alive connections; ``apt-get install wrk``) when it
is installed, else the standard library's ``http.client`` in threads (``--client`` picks one). The client
runs on the same cores as the server, so its CPU is taken from the server's; the table gives the CPU
each path spends per frame: the server process's, the client's, and the in-process threads'.

``--in-process-lanes`` adds the batching server's work without its HTTP: ``detect_batch_parallel`` threads in the
benchmark process, each running the server's own ``service.core.inference.run_frames`` (decode, one ONNX batch,
NMS per frame) on its equal share of the concurrency's frames back to back (at concurrency 4 on two lanes: two
batches of 2). It is the most micro-batching can give on this machine with no HTTP, no event loop and no thread
hand-off, so it splits the HTTP / in-process ratio into what batching saves and what the server's HTTP costs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_jiffies() -> tuple[int, int]:
    """(idle, total) CPU time of the whole machine so far, in jiffies (Linux ``/proc/stat``; zeros elsewhere)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return 0, 0
    return values[3] + values[4], sum(values)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_load(call, seconds: float, concurrency: int) -> dict:
    """``concurrency`` threads calling ``call`` back to back for ``seconds``; throughput, latency, own CPU."""
    return _run_lanes(lambda _frames: call(), seconds, concurrency, lanes=concurrency, max_batch=1)


_WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = %(ctype)s
local f = assert(io.open(%(body)s, "rb"))
wrk.body = f:read("*all")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('\\n{"requests": %%d, "duration_us": %%d, "errors": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _run_lanes(run_batch, seconds: float, concurrency: int, lanes: int, max_batch: int) -> dict:
    """``min(lanes, concurrency)`` threads, each running ``run_batch(k)`` back to back on its equal share ``k`` of
    ``concurrency`` frames (at most ``max_batch``); frames per second, batch latency, own CPU per frame."""
    threads = min(lanes, concurrency)
    shares = [concurrency // threads + (1 if i < concurrency % threads else 0) for i in range(threads)]
    shares = [min(k, max_batch) for k in shares]
    latencies: list[float] = []
    frames = [0]
    lock = threading.Lock()

    def worker(k: int, deadline: float) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            run_batch(k)
            elapsed = time.perf_counter() - t0
            with lock:
                latencies.extend([elapsed] * k)
                frames[0] += k

    def run(length: float) -> float:
        deadline = time.perf_counter() + length
        workers = [threading.Thread(target=worker, args=(k, deadline)) for k in shares]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - start

    run(min(0.3, seconds))  # warm-up
    latencies.clear()
    frames[0] = 0
    cpu = _own_cpu()
    wall = run(seconds)
    n = frames[0]
    return {"requests": n, "throughput": n / wall, "p50_ms": _percentile(latencies, 50) * 1e3,
            "p99_ms": _percentile(latencies, 99) * 1e3, "own_cpu_ms": (_own_cpu() - cpu) / n * 1e3}


LANES = "in-process lanes"


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _run_wrk(script: Path, url: str, seconds: int, concurrency: int) -> dict:
    """One ``wrk`` run (one thread, ``concurrency`` keep-alive connections); its own CPU from the child rusage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{int(seconds)}s", "--timeout", "60s", "-s", str(script),
                          url], capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["errors"] or not result["requests"]:
        raise RuntimeError(f"wrk saw {result['errors']} failed requests of {result['requests']}: {out.stdout[-2000:]}")
    n = result["requests"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"requests": n, "throughput": n / (result["duration_us"] / 1e6), "p50_ms": result["p50_us"] / 1e3,
            "p99_ms": result["p99_us"] / 1e3, "own_cpu_ms": cpu / n * 1e3}


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
    ("HTTP parsing + writing (uvicorn)", ("H11Protocol.data_received", "HttpToolsProtocol.data_received",
                                          "RequestResponseCycle.send", "_SelectorSocketTransport.write")),
    ("FastAPI dependencies + query parameters", ("solve_dependencies",)),
    ("response serialisation", ("detect_json", "serialize_response", "jsonable_encoder")),
    ("middleware + routing (the rest of the request on the loop)", ("RequestResponseCycle.run_asgi",)),
)


_LOOP_FRAMES = ("Runner.run", "BaseEventLoop.run_forever", "BaseEventLoop._run_once")  # no Python frame above the loop


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
        label = "event loop itself (uvloop / asyncio: polling, callbacks)" if names[-1] in _LOOP_FRAMES else "other"
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


def _client_words(client: str) -> str:
    return {"wrk": "wrk (one thread, keep-alive connections)",
            "http.client": "http.client threads (one keep-alive connection each)",
            "httpx": "httpx threads"}[client]


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
    parser.add_argument("--seconds", type=int, default=2, help="length of one measurement (one path, one concurrency)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per session (all paths)")
    parser.add_argument("--body", choices=("raw", "multipart"), default="raw", help="how HTTP requests carry the frame")
    parser.add_argument("--client", choices=("auto", "wrk", "http.client", "httpx"), default="auto",
                        help="load client: wrk (C, one thread; about 0.05 ms of CPU per request here), the standard "
                        "library's http.client in threads (one keep-alive connection each; about 0.5 ms) or httpx "
                        "(more); auto: wrk if installed, else http.client. The client shares the machine with the "
                        "server: its CPU is taken from the server's")
    parser.add_argument("--batch-size", type=int, default=None, help="the batching server's detect_batch_size "
                        "(default: the Settings default)")
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="its detect_batch_wait_ms (default: Settings)")
    parser.add_argument("--batch-parallel", type=int, default=None, help="its detect_batch_parallel (default: Settings)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="both servers' max_concurrent_inference, "
                        "which caps the frames a batch can gather (default: the highest --concurrency)")
    parser.add_argument("--in-process-lanes", action="store_true",
                        help="also measure the batching server's lanes in-process (micro-batching without HTTP)")
    parser.add_argument("--profile", default=None, help="also py-spy the batching server over --seconds of sequential "
                        "requests and write the breakdown (and the raw samples next to it)")
    parser.add_argument("--out", default=None, help="also write the results table (markdown) here")
    args = parser.parse_args(argv)
    load_client = args.client
    if load_client == "auto":
        load_client = "wrk" if shutil.which("wrk") else "http.client"
        if load_client != "wrk":
            print("wrk is not installed (apt-get install wrk): the load client is http.client threads", file=sys.stderr)
    if load_client == "wrk" and args.body != "raw":
        parser.error("--client wrk sends the raw body only")

    import httpx

    from service.core.config import DEFAULT_MODEL_ID, Settings
    from service.core.images import decode_upload
    from service.core.inference import FrameJob, run_frames, runtime_loader
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
                servers[name] = _start_server(home, port, args.threads, args.max_concurrent or max_c, size, batch_wait,
                                              parallel)
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
                if load_client == "httpx":
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

            def lanes_batch(k: int) -> None:  # the batching server's lane work on k frames, without HTTP
                jobs = [FrameJob(decode=lambda: decode_upload(jpeg, 10 * 1024 * 1024, 40_000_000, target),
                                 nbytes=len(jpeg)) for _ in range(k)]
                for result in run_frames(detector, jobs):
                    if isinstance(result, BaseException):
                        raise result

            # same boxes on every path, checked once
            image, found = local_call()
            sx, sy = image.scale
            local = np.asarray([[d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy] for d in found]).reshape(-1, 4)
            for name, http_client in clients.items():
                remote = http_call(http_client)["detections"]
                assert np.allclose(local, np.asarray([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in remote]).reshape(-1, 4),
                                   atol=1e-3), f"{name} boxes differ from the runtime's"

            wrk_script = Path(tmp) / "post.lua"
            if load_client == "wrk":
                frame_path = Path(tmp) / "frame.jpg"
                frame_path.write_bytes(jpeg)
                wrk_script.write_text(_WRK_SCRIPT % {"ctype": _lua_string(ctype), "body": _lua_string(str(frame_path))})

            def measure(name: str, c: int, seconds: int) -> dict:
                idle, total = _machine_jiffies()
                if name == "in-process":
                    result = _run_load(local_call, seconds, c)
                elif name == LANES:
                    result = _run_lanes(lanes_batch, seconds, c, parallel, batch_size)
                else:
                    server_cpu = _process_cpu(servers[name].pid)
                    if load_client == "wrk":
                        result = _run_wrk(wrk_script, f"{clients[name].base_url}/v1/detect", seconds, c)
                    else:
                        result = _run_load(lambda: http_call(clients[name]), seconds, c)
                    result["server_cpu_ms"] = (_process_cpu(servers[name].pid) - server_cpu) / result["requests"] * 1e3
                idle_after, total_after = _machine_jiffies()
                result["idle_pct"] = 100.0 * (idle_after - idle) / max(total_after - total, 1)
                return result

            paths = ["in-process", *([LANES] if args.in_process_lanes else []), *servers]
            for name in servers:  # warm-up: sessions, connections, the batchers' peaks
                measure(name, max_c, 1)
            results: dict[tuple[str, int], list[dict]] = {}
            loads: list[float] = []
            for _ in range(args.rounds):
                for c in args.concurrency:
                    for name in paths:
                        results.setdefault((name, c), []).append(measure(name, c, args.seconds))
                loads.append(os.getloadavg()[0])

            if args.profile:
                raw_path = Path(args.profile).with_suffix(".raw.txt")
                time.sleep(2 * 0.5 + 0.1)  # the batcher forgets the last peak: a lone frame does not wait for company
                spy = subprocess.Popen(["py-spy", "record", "-r", "500", "-f", "raw", "-o", str(raw_path), "-t", "--nonblocking",
                                        "-p", str(servers["http batched"].pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
                profiled = measure("http batched", 1, args.seconds)
                spy.send_signal(2)
                spy.wait(timeout=60)
                profile_text = summarise_profile(raw_path, profiled["requests"])
                profile_text += (f"\n\nWhile profiled: {1000.0 / profiled['throughput']:.2f} ms per request (wall), "
                                 f"p50 {profiled['p50_ms']:.2f} ms; server CPU {profiled['server_cpu_ms']:.2f} ms per "
                                 "request (the sampler itself included).")
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
        f"frame {width}x{height} JPEG ({len(jpeg)} bytes) sent as {args.body} body by {_client_words(load_client)}, "
        f"model input {detector.imgsz[0]}x{detector.imgsz[1]}, {args.seconds} s per measurement x {args.rounds} "
        f"interleaved rounds, medians; batching server: detect_batch_size {batch_size}, detect_batch_wait_ms "
        f"{batch_wait:g}, detect_batch_parallel {parallel}; max_concurrent_inference {args.max_concurrent or max_c}. "
        f"Load average (1 min) before: {load_before:.2f}, after each round: "
        f"{', '.join(f'{v:.2f}' for v in loads)}.",
        "",
        "CPU ms / frame: the server process's (HTTP paths) or the calling threads' (in-process), per request; "
        "client CPU: the load client's, per request; idle: the machine's idle CPU time over the measurement "
        "(both cores, everything running on them).",
        "",
        "| concurrency | path | req/s | p50 ms | p99 ms | CPU ms / frame | client CPU ms / req | idle | "
        "HTTP / in-process throughput |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary: dict[str, dict[int, float]] = {}
    for c in args.concurrency:
        base = med("in-process", c, "throughput")
        for name in paths:
            ratio = med(name, c, "throughput") / base
            local = name in ("in-process", LANES)
            if name != "in-process":
                summary.setdefault(name, {})[c] = round(ratio, 3)
            cpu = med(name, c, "own_cpu_ms" if local else "server_cpu_ms")
            client_cpu = "" if local else f"{med(name, c, 'own_cpu_ms'):.2f}"
            lines.append(
                f"| {c} | {name} | {med(name, c, 'throughput'):.1f} | {med(name, c, 'p50_ms'):.2f} | "
                f"{med(name, c, 'p99_ms'):.2f} | {cpu:.2f} | {client_cpu} | {med(name, c, 'idle_pct'):.0f}% | "
                f"{'' if name == 'in-process' else f'{ratio:.2f}x'} |"
            )
    lines += ["", "HTTP / in-process throughput round by round (the spread is the run-to-run noise): " + "; ".join(
        f"{name} at {c}: " + ", ".join(f"{r['throughput'] / base['throughput']:.2f}"
                                        for r, base in zip(results[(name, c)], results[("in-process", c)]))
        for c in args.concurrency for name in paths[1:]) + "."]
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
