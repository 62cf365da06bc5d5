"""Gradient checkpointing (same gradients, >= 40% fewer activation bytes) and gradient accumulation."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch import nn

from models.detection import DetectionModel
from models.parts import CHECKPOINT_POLICIES
from training.memory import measure_memory
from training.recipe import DistInfo, build_criterion, micro_batch_loss, train_step


def _batch(n: int, imgsz: int, seed: int = 0, per_image: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    k = per_image * n
    return {
        "img": (torch.rand(n, 3, imgsz, imgsz, generator=g) * 255).to(torch.uint8),
        "batch_idx": torch.arange(n).repeat_interleave(per_image).float(),
        "cls": torch.randint(0, 3, (k, 1), generator=g).float(),
        "bboxes": torch.cat([torch.rand(k, 2, generator=g) * 0.6 + 0.2, torch.rand(k, 2, generator=g) * 0.3 + 0.2], 1),
    }


def _grads_and_memory(model: nn.Module, batch: dict):
    crit = build_criterion(model)
    model.zero_grad(set_to_none=True)
    report = measure_memory(model, None, lambda: micro_batch_loss(model, crit, batch, torch.device("cpu"), nullcontext)[0].backward())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, report


@pytest.mark.parametrize("policy", CHECKPOINT_POLICIES)
def test_checkpointing_same_gradients_and_40_percent_fewer_activation_bytes(policy):
    """YOLO11s at 320 px, backbone + neck; ``-s`` prints the bytes docs/benchmarks/training.md quotes."""
    torch.manual_seed(0)
    model = DetectionModel("yolo11s", nc=3, imgsz=320).train()
    for m in model.modules():  # BatchNorm in eval mode: both passes normalise identically
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    batch = _batch(1, 320)
    plain_grads, plain = _grads_and_memory(model, batch)
    model.set_gradient_checkpointing(("backbone", "neck"), policy)
    ckpt_grads, ckpt = _grads_and_memory(model, batch)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 100
    for name, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    saved = 1 - ckpt.activations / plain.activations
    print(f"\npolicy {policy}: activations {plain.activations:,} -> {ckpt.activations:,} bytes ({-saved:+.1%}), "
          f"layers {sorted(model.checkpoint_layers)}")
    assert saved >= 0.40, f"checkpointing ({policy}) saved only {saved:.1%} of {plain.activations} activation bytes"


def test_accumulated_micro_batches_equal_one_larger_batch():
    """k micro-batches with accumulation give the gradient of one k-times larger batch.

    ultralytics' loss normalises each batch by its total assigned target score, and
    BatchNorm uses per-batch statistics, so the two agree exactly when the micro-batches
    carry equal target mass and statistics: here the large batch is the micro-batch
    repeated, BatchNorm runs in eval mode. ultralytics also clamps that normaliser at 1,
    so the images carry enough boxes (12 at 96 px) for the clamp to stay inactive. The
    scaling (1 / accumulate, per-image loss) is what this checks; the 2-process test
    checks splitting different images.
    """
    torch.manual_seed(0)
    model = DetectionModel("yolo11n", nc=3, imgsz=96).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    crit = build_criterion(model)
    micro = _batch(2, 96, seed=1, per_image=12)
    big = {k: torch.cat([micro[k], micro[k] + (2 if k == "batch_idx" else 0)]) for k in micro}

    parts = train_step(model, crit, iter([micro, micro]), accumulate=2, device=torch.device("cpu"), autocast=nullcontext,
                       dist_info=DistInfo())
    acc = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss, _ = micro_batch_loss(model, crit, big, torch.device("cpu"), nullcontext)
    loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(acc[n], p.grad, rtol=1e-4, atol=1e-6)
    assert abs(parts["loss"] - loss.item()) < 1e-4
