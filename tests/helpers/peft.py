"""PEFT test helpers: images, a loss over every head output, a few SGD steps, output comparison."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from tests.helpers.models import IMGSZ


def images(n: int = 2, size: int = IMGSZ, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def loss_fn(out) -> torch.Tensor:
    """Any differentiable function of every head output will do for PEFT mechanics."""
    return out["scores"].float().sigmoid().mean() + 1e-2 * out["boxes"].float().pow(2).mean()


def train_steps(model: nn.Module, steps: int = 2, size: int = 64, lr: float = 0.05) -> None:
    """``steps`` SGD steps of a detector's trainable parameters on fixed random images, ending in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    for i in range(steps):
        opt.zero_grad()
        loss_fn(model(images(2, size, seed=10 + i))).backward()
        opt.step()
    model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    model.eval()
    return model(images(1, 64) if x is None else x)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    """Raw head outputs in train mode (a fresh model's decoded scores all sit near the class prior)."""
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model.train()
    out = model(images(1, 64) if x is None else x)
    model.eval()
    model.load_state_dict(buffers, strict=False)  # leave BatchNorm statistics as they were
    return torch.cat([out["scores"], out["boxes"]], dim=1)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)
