"""Synthetic generator speed on one core: images per second at a given size, render only and written to disk.

    python benchmarks/data_synth.py --imgsz 160 --n 200 --repeats 3

Runs in one process (one core; numpy/PIL single-threaded), domains interleaved,
reports the median over repeats, both per wall-clock second and per CPU second of
this process (the second is what one core delivers when the machine is shared and
the process waits for a core). Results go in docs/benchmarks/data.md.
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
    render: dict[str, list[tuple[float, float]]] = {d: [] for d in domains}
    write: dict[str, list[tuple[float, float]]] = {d: [] for d in domains}

    def rate(t0: float, c0: float) -> tuple[float, float]:
        return args.n / (time.perf_counter() - t0), args.n / (time.process_time() - c0)

    for d in domains:
        render_sample(0, domain=d, imgsz=args.imgsz)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for d in domains:
                t, c = time.perf_counter(), time.process_time()
                for i in range(args.n):
                    render_sample(i, seed=r, domain=d, imgsz=args.imgsz)
                render[d].append(rate(t, c))
                t, c = time.perf_counter(), time.process_time()
                generate_dataset(Path(tmp) / f"{d}{r}", d, n=args.n, imgsz=args.imgsz, seed=r)
                write[d].append(rate(t, c))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, python {platform.python_version()}")
    print(f"imgsz={args.imgsz} n={args.n} repeats={args.repeats} (median img/s, one process); load average {os.getloadavg()[0]:.1f}")
    print("| domain | render, per wall s | render, per CPU s | generate_dataset (PNG + labels), per wall s | per CPU s |")
    print("| --- | --- | --- | --- | --- |")
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    for d in domains:
        print(f"| {d} | {med(render[d], 0):.0f} | {med(render[d], 1):.0f} | {med(write[d], 0):.0f} | {med(write[d], 1):.0f} |")


if __name__ == "__main__":
    main()
