"""A short YOLO11n full fine-tune with each optimizer (the few-hundred-step version is benchmarks/optimizers.py)."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.optim import yolo_batch
from ultralytics.utils.loss import v8DetectionLoss

from models import DetectionModel
from training.memory import measure_memory, optimizer_state_bytes
from training.optim import build_optimizer

SETTINGS = {
    "adamw": {},
    "coap": {"rank_ratio_cnn": 8, "rank_ratio_matrix": 8, "update_interval": 2, "reproject_factor": 2},
    "coap8bit": {"rank_ratio_cnn": 8, "rank_ratio_matrix": 8, "update_interval": 2, "reproject_factor": 2},
    "galore": {"rank_ratio_matrix": 8, "update_interval": 2},
}


@pytest.fixture(scope="module")
def yolo_runs():
    imgs, batch = yolo_batch(n=4, imgsz=96)
    out = {}
    for name, kw in SETTINGS.items():
        torch.manual_seed(0)
        model = DetectionModel("yolo11n", nc=3)
        model.train()
        crit = v8DetectionLoss(model)
        opt = build_optimizer(name, [p for p in model.parameters() if p.requires_grad], lr=1e-3, **kw)
        losses = []
        for _ in range(5):  # crosses correlation updates (steps 2, 6) and a randomised SVD (step 4)
            opt.zero_grad()
            loss, _ = crit(model(imgs), batch)
            loss.sum().backward()
            opt.step()
            losses.append(loss.sum().item())
        out[name] = (losses, optimizer_state_bytes(opt), model, opt)
    return out


def test_yolo_losses_finite_and_decreasing(yolo_runs):
    for name, (losses, _, _, _) in yolo_runs.items():
        assert all(torch.isfinite(torch.tensor(losses))), name
        assert losses[-1] < losses[0], name


def test_yolo_state_bytes_ratios(yolo_runs):
    adamw = yolo_runs["adamw"][1]
    assert yolo_runs["coap"][1] <= 0.35 * adamw
    assert yolo_runs["coap8bit"][1] <= 0.15 * adamw


def test_yolo_memory_report(yolo_runs):
    _, _, model, opt = yolo_runs["coap"]
    imgs, batch = yolo_batch(n=4, imgsz=96, seed=1)
    crit = v8DetectionLoss(model)

    def step():
        loss, _ = crit(model(imgs), batch)
        loss.sum().backward()
        return loss

    report = measure_memory(model, opt, step)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.params_trainable == 4 * n_trainable
    assert report.params_frozen == 4 * 16  # the DFL head's fixed 1x1 conv
    assert report.gradients == 4 * n_trainable
    assert report.optimizer_state == optimizer_state_bytes(opt)
    assert report.activations > 0 and report.buffers > 0
