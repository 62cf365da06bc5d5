"""MemoryReport: exact byte counts on hand-computable models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.memory import MemoryReport, SavedTensorCounter, count_parameters, measure_memory
from training.optim import build_optimizer


def _linear_step(model, x):
    def step():
        loss = model(x).pow(2).sum()
        loss.backward()
        return loss

    return step


def test_linear_layer_is_exact():
    model = nn.Linear(10, 4)  # 40 + 4 float32 = 176 bytes
    x = torch.randn(3, 10)
    opt = torch.optim.AdamW(model.parameters())
    report = measure_memory(model, opt, _linear_step(model, x))
    assert report.params_trainable == 176
    assert report.params_frozen == report.params_quantized == report.buffers == 0
    assert report.gradients == 176
    assert report.optimizer_state == 2 * 176 + 2 * 4  # exp_avg + exp_avg_sq + one float32 step per parameter
    # addmm saves its input x (3x10) — the weight it also saves is a parameter, not an activation;
    # pow saves the linear output (3x4)
    assert report.activations == 3 * 10 * 4 + 3 * 4 * 4
    assert report.total == 176 + 176 + 360 + 168
    assert report.cuda_max_allocated is None
    d = report.to_dict()
    assert d["total"] == report.total and d["activations"] == 168


def test_coap_state_counts_projections():
    torch.manual_seed(0)
    model = nn.Linear(32, 64, bias=False)  # grad 64x32: m=64 >= n=32, P is r x 32
    opt = build_optimizer("coap", model.parameters(), rank=4, min_numel=0)
    report = measure_memory(model, opt, _linear_step(model, torch.randn(2, 32)))
    # step (4) + exp_avg, exp_avg_sq (64x4 each) + P (4x32), float32
    assert report.optimizer_state == 4 + 2 * 64 * 4 * 4 + 4 * 32 * 4


def test_frozen_quantized_and_buffers():
    class Quantized(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("weight_nf4", torch.zeros(32, dtype=torch.uint8))  # 32 bytes
            self.register_buffer("absmax", torch.ones(2))  # its scales: 8 bytes

        def forward(self, x):
            return x

    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), Quantized(), nn.Conv2d(4, 2, 1))
    model[0].weight.requires_grad_(False)  # 12 floats frozen
    report = MemoryReport()
    count_parameters(model, report)
    assert report.params_frozen == 12 * 4
    assert report.params_trainable == (4 + 4 + 8 + 2) * 4  # BN weight + bias, conv2 weight + bias
    assert report.params_quantized == 32 + 8
    assert report.buffers == 4 * 4 * 2 + 8  # running mean / var + num_batches_tracked (int64)


def test_activations_deduplicate_storage_and_shrink_with_checkpointing():
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorCounter() as c:
        y = x.exp()  # saves its result (4x8)
        z = y * y  # saves y twice: the same storage, counted once
        (z.sum()).backward()
    assert c.nbytes == 4 * 8 * 4 * 1 and len(c.storages) == 1

    block = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16))
    inp = torch.randn(8, 16)

    def plain():
        block(inp).sum().backward()

    def checkpointed():
        checkpoint(block, inp, use_reentrant=False).sum().backward()

    full = measure_memory(block, None, plain).activations
    ckpt = measure_memory(block, None, checkpointed).activations
    assert full == (8 * 16 + 8 * 64) * 4  # input; tanh output (saved by tanh and the 2nd linear: one storage)
    assert ckpt < full


def test_in_backward_frees_gradients_and_table_renders():
    torch.manual_seed(0)
    model = nn.Linear(10, 4)
    opt = build_optimizer("adamw", model.parameters(), in_backward=True, model=model)
    report = measure_memory(model, opt, _linear_step(model, torch.randn(3, 10)))
    assert report.gradients == 0
    assert report.optimizer_state == 360
    table = report.table()
    for label in ("parameters (trainable)", "gradients", "optimizer state", "activations saved for backward", "total"):
        assert label in table
    assert "100.0%" in table and f"{report.total:,}" in table


def test_nf4_base_weight_counts_as_quantized():
    nf4 = pytest.importorskip("service.layers.tuners.nf4")
    torch.manual_seed(0)
    holder = nn.Module()
    holder.nf4 = nf4.NF4Weight(torch.randn(32, 16, 3, 3), blocksize=64, double_quant=True)
    holder.bias = nn.Parameter(torch.zeros(32))
    report = MemoryReport()
    count_parameters(holder, report)
    expected = sum(b.numel() * b.element_size() for b in holder.nf4.buffers())
    assert report.params_quantized == expected > 0
    assert expected < 32 * 16 * 9  # under a byte per weight: 4-bit codes + scales
    assert report.buffers == 0 and report.params_trainable == 32 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_is_reported():
    model = nn.Linear(64, 32).cuda()
    opt = build_optimizer("coap", model.parameters(), rank=4, min_numel=0)
    report = measure_memory(model, opt, _linear_step(model, torch.randn(8, 64, device="cuda")))
    assert report.cuda_max_allocated is not None and report.cuda_max_allocated >= report.params_trainable
    assert "CUDA max_memory_allocated" in report.table()
