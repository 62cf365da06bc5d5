"""Small helpers shared by the PEFT tests: tiny models, a few training steps, output comparison."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from models import DetectionModel

IMGSZ = 128


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread for these small models: with 2 threads, a busy shared CPU makes
    OpenMP workers spin and the same test runs 10x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(cfg: str = "yolo11n", nc: int = 3, seed: int = 0) -> DetectionModel:
    torch.manual_seed(seed)
    return DetectionModel(cfg, nc=nc, imgsz=IMGSZ)


def images(n: int = 2, size: int = IMGSZ, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def loss_fn(out) -> torch.Tensor:
    """Any differentiable function of every head output will do for PEFT mechanics."""
    return out["scores"].float().sigmoid().mean() + 1e-2 * out["boxes"].float().pow(2).mean()


def train_steps(model: nn.Module, steps: int = 2, size: int = 64, lr: float = 0.05) -> None:
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


class TinyNet(nn.Module):
    """Conv (strided, dilated, with bias) + grouped conv + Linear: every layer kind LoRA meets."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=2, dilation=2, bias=True)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.bn(self.dw(self.conv(x))).relu()
        return self.fc(x.mean(dim=(2, 3)))
