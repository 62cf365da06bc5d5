"""Shared test setup: offline ultralytics, few threads, deterministic seeds, small generated data."""

from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tests also start subprocesses (uvicorn, job workers, gloo ranks); two threads per
# process oversubscribe the 2-core CI machine and run many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
