"""benchmarks/service.py's in-process lanes: the concurrency's frames split evenly over the lanes, as the server's
micro-batcher splits frames that start together."""

from __future__ import annotations

import threading

import pytest

from benchmarks.service import _run_lanes


@pytest.mark.parametrize("concurrency, lanes, max_batch, batches", [
    (4, 2, 8, [2, 2]),
    (1, 2, 8, [1]),
    (5, 2, 8, [2, 3]),
    (16, 2, 4, [4, 4]),
])
def test_lanes_take_equal_shares(concurrency, lanes, max_batch, batches):
    sizes: set[int] = set()
    lock = threading.Lock()

    def run_batch(k: int) -> None:
        with lock:
            sizes.add(k)

    result = _run_lanes(run_batch, 0.05, concurrency, lanes, max_batch)
    assert sizes == set(batches)
    assert result["requests"] > 0 and result["throughput"] > 0
