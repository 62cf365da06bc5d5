"""The recipe trains in channels-last layout on the CPU: same losses, gradients and BatchNorm statistics as NCHW."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from service.layers.peft import apply_lora
from tests.helpers.models import make_model
from tests.helpers.peft import images, loss_fn
from training.recipe import training_memory_format


def test_cpu_training_is_channels_last_and_cuda_keeps_its_layout():
    assert training_memory_format(torch.device("cpu")) is torch.channels_last
    assert training_memory_format(torch.device("cuda")) is torch.preserve_format


def _step(model: nn.Module, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n}
    return loss.detach(), grads, stats


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("checkpointing", [None, "all", "high_res"])
def test_channels_last_training_step_equals_nchw(method, checkpointing):
    model = make_model(imgsz=64)
    if method == "lora":
        model = apply_lora(model, rank=4)
        for name, p in model.named_parameters():  # B starts at zero: give the adapters a non-zero delta
            if "lora_B" in name:
                nn.init.normal_(p, std=0.05)
    model.train()
    channels_last = copy.deepcopy(model).to(memory_format=training_memory_format(torch.device("cpu")))
    if checkpointing:
        channels_last.set_gradient_checkpointing(("backbone", "neck", "head"), policy=checkpointing)
    kernels = [p for p in channels_last.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in kernels)
    x = images(2, 64)
    loss, grads, stats = _step(model, x)
    cl_loss, cl_grads, cl_stats = _step(channels_last, x)
    torch.testing.assert_close(cl_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == cl_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(cl_grads[name], g, rtol=1e-3, atol=1e-5, msg=name)
    for name, s in stats.items():  # running statistics updated once, checkpointing's recompute included
        torch.testing.assert_close(cl_stats[name], s, rtol=1e-4, atol=1e-6, msg=name)
