"""Batch-1 latency of exported ONNX files side by side, with onnxruntime and NumPy alone (no torch, no project
imports): copy it with the files to a target machine and run it there.

    python benchmarks/onnx_latency.py fp32.onnx int8.onnx --rounds 300 --threads 1

The first file is the reference. Every file runs once per round, in a new random order each round, after 5
warm-up calls; medians of wall time and of the calling thread's CPU time, load average before and after.
``--profile N`` adds where the time goes: onnxruntime's profiler over N more runs of each file (a session of its
own, after the timing), kernel time per run by operator type. The profiler adds a fixed cost to every kernel,
so read its shares, not its totals, against the timing table.

``--batches 1,2,4,8`` times the first file (it needs a dynamic batch axis: ``glasses-vision export --dynamic-batch``)
at each batch size instead, interleaved the same way: wall and process-CPU milliseconds *per frame*, against batch 1.
That is what the server's micro-batching can save per frame (``docs/benchmarks/service.md``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="ONNX files (the first is the reference)")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--imgsz", type=int, default=None, help="input size for files without a static one")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N runs of each file: kernel time per run by operator type")
    parser.add_argument("--batches", default=None, metavar="B,B,...",
                        help="time the first file (dynamic batch axis) at these batch sizes: ms per frame")
    args = parser.parse_args(argv)
    batches = _batch_sizes(parser, args.batches)

    import numpy as np
    import onnxruntime as ort

    files: dict[str, Path] = {}
    for f in args.files:  # labelled as given; a file named twice is timed twice (a noise check)
        files[f if f not in files else f"{f} (again)"] = Path(f)
    sessions = {name: ort.InferenceSession(str(path), _options(ort, args.threads), providers=["CPUExecutionProvider"])
                for name, path in files.items()}
    first_input = next(iter(sessions.values())).get_inputs()[0]
    h, w = (d if isinstance(d, int) and d > 0 else args.imgsz for d in first_input.shape[2:])
    if not h or not w:
        parser.error("the first file has no static input size: pass --imgsz")
    x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
    if batches:
        return batch_scaling(sessions[next(iter(sessions))], batches, (h, w), args, argv)
    calls = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for name, s in sessions.items()}
    for call in calls.values():
        for _ in range(5):
            call()
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    items, order = list(calls.items()), np.random.default_rng(0)
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for i in order.permutation(len(items)):
            name, call = items[i]
            c, t = time.thread_time(), time.perf_counter()
            call()
            wall[name].append((time.perf_counter() - t) * 1000)
            cpu[name].append((time.thread_time() - c) * 1000)
    load_after = os.getloadavg()
    ref = next(iter(calls))
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    fmt = lambda la: ", ".join(f"{v:.2f}" for v in la)  # noqa: E731
    print(f"command: python benchmarks/onnx_latency.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs; onnxruntime {ort.__version__}; "
          f"load average {fmt(load_before)} before, {fmt(load_after)} after")
    print(f"input {h}x{w}, batch 1, threads {args.threads}, {args.rounds} interleaved rounds\n")
    print(f"| file | median wall ms | wall ratio | median thread-CPU ms | CPU ratio (vs {ref}) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k in calls:
        print(f"| {k} | {med[k]:.2f} | {med[k] / med[ref]:.2f}x | {med_cpu[k]:.2f} | {med_cpu[k] / med_cpu[ref]:.2f}x |")
    if args.profile:
        by_op = {name: kernel_time_by_op(path, x, args.profile, args.threads) for name, path in files.items()}
        ops = sorted({op for times in by_op.values() for op in times},
                     key=lambda op: -max(times.get(op, (0, 0.0))[1] for times in by_op.values()))
        totals = {name: sum(us for _, us in times.values()) for name, times in by_op.items()}
        print(f"\nonnxruntime profiler, {args.profile} runs of each file: kernel time per run by operator type, "
              "us (share; kernels per run)\n")
        print("| operator type | " + " | ".join(by_op) + " |")
        print("| --- |" + " ---: |" * len(by_op))
        for op in ops:
            cells = [f"{times[op][1]:.0f} ({100 * times[op][1] / totals[name]:.0f} %; {times[op][0]})" if op in times
                     else "" for name, times in by_op.items()]
            print(f"| {op} | " + " | ".join(cells) + " |")
        print("| total | " + " | ".join(f"{totals[name]:.0f} ({sum(n for n, _ in by_op[name].values())} kernels)"
                                      for name in by_op) + " |")
    return 0


def _batch_sizes(parser: argparse.ArgumentParser, text: str | None) -> list[int]:
    if text is None:
        return []
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        parser.error(f"--batches takes positive batch sizes separated by commas (e.g. 1,2,4,8), got {text!r}")
    return sorted(set(sizes))


def batch_scaling(session, batches: list[int], hw: tuple[int, int], args, argv) -> int:
    """Per-frame wall and process-CPU time of ``session`` at each batch size, interleaved rounds, medians."""
    import numpy as np
    import onnxruntime as ort

    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    feeds = {b: {name: rng.random((b, 3, *hw), dtype=np.float32)} for b in batches}
    try:
        for feed in feeds.values():
            for _ in range(3):
                session.run(None, feed)
    except Exception as exc:  # onnxruntime's own error for a static batch axis
        print(f"error: {args.files[0]} does not take these batch sizes ({type(exc).__name__}: {exc}); "
              "export it with --dynamic-batch", file=sys.stderr)
        return 2
    wall: dict[int, list[float]] = {b: [] for b in batches}
    cpu: dict[int, list[float]] = {b: [] for b in batches}
    order = np.random.default_rng(0)
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for i in order.permutation(len(batches)):
            b = batches[i]
            c, t = time.process_time(), time.perf_counter()
            session.run(None, feeds[b])
            wall[b].append((time.perf_counter() - t) * 1000 / b)
            cpu[b].append((time.process_time() - c) * 1000 / b)
    load_after = os.getloadavg()
    med = {b: statistics.median(v) for b, v in wall.items()}
    med_cpu = {b: statistics.median(v) for b, v in cpu.items()}
    ref = batches[0]
    fmt = lambda la: ", ".join(f"{v:.2f}" for v in la)  # noqa: E731
    print(f"command: python benchmarks/onnx_latency.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs; onnxruntime {ort.__version__}; "
          f"load average {fmt(load_before)} before, {fmt(load_after)} after")
    print(f"file {args.files[0]}, input {hw[0]}x{hw[1]}, threads {args.threads}, {args.rounds} interleaved rounds\n")
    print(f"| batch | median wall ms / frame | vs batch {ref} | median process-CPU ms / frame | vs batch {ref} |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for b in batches:
        print(f"| {b} | {med[b]:.2f} | {med[b] / med[ref]:.2f}x | {med_cpu[b]:.2f} | {med_cpu[b] / med_cpu[ref]:.2f}x |")
    return 0


def _options(ort, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return options


def kernel_time_by_op(path: Path, x, runs: int, threads: int) -> dict[str, tuple[int, float]]:
    """onnxruntime's profiler over ``runs`` calls: operator type -> (kernels per run, microseconds per run)."""
    import json
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = _options(ort, threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    count: dict[str, int] = {}
    micros: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            count[op] = count.get(op, 0) + 1
            micros[op] = micros.get(op, 0.0) + event["dur"]
    return {op: (round(count[op] / runs), micros[op] / runs) for op in count}


if __name__ == "__main__":
    sys.exit(main())
