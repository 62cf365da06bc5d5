"""Batch-1 latency of exported ONNX files side by side, with onnxruntime and NumPy alone (no torch, no project
imports): copy it with the files to a target machine and run it there.

    python benchmarks/onnx_latency.py fp32.onnx int8.onnx --rounds 300 --threads 1

The first file is the reference. Every file runs once per round, in a new random order each round, after 5
warm-up calls; medians of wall time and of the calling thread's CPU time, load average before and after.
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
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime as ort

    files: dict[str, Path] = {}
    for f in args.files:  # labelled as given; a file named twice is timed twice (a noise check)
        files[f if f not in files else f"{f} (again)"] = Path(f)
    sessions = {}
    for name, path in files.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        options.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    first_input = next(iter(sessions.values())).get_inputs()[0]
    h, w = (d if isinstance(d, int) and d > 0 else args.imgsz for d in first_input.shape[2:])
    if not h or not w:
        parser.error("the first file has no static input size: pass --imgsz")
    x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
