"""Synthetic generator speed on one core: images per second at a given size, render only and written to disk.

    python benchmarks/data_synth.py --imgsz 160 --n 200 --repeats 3

Runs in one process (one core; numpy/PIL single-threaded), domains interleaved,
reports the median over repeats. Results go in docs/benchmarks/data.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from training.data.synthetic import generate_dataset, render_sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--n", type=int, default=200, help="images per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    domains = ("source", "egocentric")
    render: dict[str, list[float]] = {d: [] for d in domains}
    write: dict[str, list[float]] = {d: [] for d in domains}
    for d in domains:
        render_sample(0, domain=d, imgsz=args.imgsz)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for d in domains:
                t = time.perf_counter()
                for i in range(args.n):
                    render_sample(i, seed=r, domain=d, imgsz=args.imgsz)
                render[d].append(args.n / (time.perf_counter() - t))
                t = time.perf_counter()
                generate_dataset(Path(tmp) / f"{d}{r}", d, n=args.n, imgsz=args.imgsz, seed=r)
                write[d].append(args.n / (time.perf_counter() - t))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, python {platform.python_version()}")
    print(f"imgsz={args.imgsz} n={args.n} repeats={args.repeats} (median img/s, one process)")
    print("| domain | render only (img/s) | generate_dataset incl. PNG + labels (img/s) |")
    print("| --- | --- | --- |")
    for d in domains:
        print(f"| {d} | {statistics.median(render[d]):.0f} | {statistics.median(write[d]):.0f} |")


if __name__ == "__main__":
    main()
