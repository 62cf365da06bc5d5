"""Small models and problems shared by the optimizer and memory tests."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn


class TinyNet(nn.Module):
    """A Linear (matrix layout), a 3×3 conv (Tucker layout), a 1×1 conv (matrix layout) and 1-D tensors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 5, 1, bias=False)
        self.fc = nn.Linear(5 * 4 * 4, 7)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = self.point(x)
        return self.fc(x.flatten(1))


def tiny_batch(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, 4, 4, generator=g), torch.randn(n, 7, generator=g)


def train_steps(model, opt, steps: int, seed: int = 0, closure_hook=None, scheduler=None):
    """Run ``steps`` MSE steps on fixed random batches; returns the losses."""
    losses = []
    for i in range(steps):
        x, y = tiny_batch(seed + i)
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        if closure_hook is not None:
            closure_hook(model)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def regression_problem(seed: int = 0, n: int = 512, d_in: int = 96, d_hidden: int = 128, d_out: int = 32):
    """A two-layer regression target with a random teacher; returns (X, Y, student factory)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    teacher = nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))
    torch.manual_seed(seed + 1)
    for p in teacher.parameters():
        nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        y = teacher(x)

    def student():
        torch.manual_seed(seed + 2)
        return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))

    return x, y, student


def roundtrip_state(opt) -> dict:
    """``opt.state_dict()`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def clone_model(model):
    return copy.deepcopy(model)


def yolo_batch(n: int = 2, imgsz: int = 64, seed: int = 0):
    """Random images with one random box each, in the batch format ultralytics' v8DetectionLoss takes."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(n, 3, imgsz, imgsz, generator=g)
    wh = 0.2 + 0.3 * torch.rand(n, 2, generator=g)
    xy = 0.3 + 0.4 * torch.rand(n, 2, generator=g)
    batch = {
        "batch_idx": torch.arange(n, dtype=torch.float32),
        "cls": torch.randint(0, 3, (n, 1), generator=g).float(),
        "bboxes": torch.cat([xy, wh], 1),
    }
    return imgs, batch


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: these small ops run far slower with 2 threads on a shared, oversubscribed CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
