"""Optimizer / memory test helpers: fixed random batches for ``TinyNet``, MSE steps, a regression problem, YOLO batches."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn


def tiny_batch(seed: int = 0, n: int = 4):
    """Inputs and MSE targets for ``tests.helpers.models.TinyNet``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, 4, 4, generator=g), torch.randn(n, 7, generator=g)


def mse_steps(model, opt, steps: int, seed: int = 0, closure_hook=None, scheduler=None):
    """Run ``steps`` MSE steps of ``opt`` on fixed random ``tiny_batch`` batches; returns the losses."""
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
