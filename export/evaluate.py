"""mAP and latency of an exported file: the ONNX model behind ``training.evaluate`` and a batch-1 timer."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.runtime import Detector


class OnnxModule(nn.Module):
    """An onnxruntime session dressed as a DetectionModel in eval mode, so ``training.evaluate`` measures it as it is."""

    def __init__(self, path: str | Path, threads: int | None = 1):
        super().__init__()
        self.detector = Detector(path, threads=threads)
        self.names = dict(enumerate(self.detector.names))
        self.imgsz = self.detector.imgsz[0]
        self._device_anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # evaluate() reads the device from it

    @property
    def nc(self) -> int:
        return len(self.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.detector.raw(x.detach().cpu().numpy()))


def evaluate_onnx(path: str | Path, data: Any, split: str = "val", quiet: bool = True, threads: int | None = 1) -> dict[str, Any]:
    """``training.evaluate`` (mAP50, mAP50-95, ...) of the exported file on a dataset split."""
    from models.errors import ConfigError
    from training.evaluate import evaluate

    module = OnnxModule(path, threads=threads)
    h, w = module.detector.imgsz
    if h != w:
        raise ConfigError(f"mAP evaluation letterboxes to a square; {path} was exported at {h}x{w}")
    return evaluate(module, data, split=split, imgsz=h, batch=8, quiet=quiet)


def measure_latency(path: str | Path, threads: int = 1, warmup: int = 3, runs: int = 20) -> dict[str, float]:
    """Batch-1 latency (ms) of the ONNX graph alone on a fixed random input: median and spread."""
    det = Detector(path, threads=threads)
    x = np.random.default_rng(0).random((1, 3, *det.imgsz), dtype=np.float32)
    for _ in range(warmup):
        det.raw(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        det.raw(x)
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": runs, "threads": threads}
