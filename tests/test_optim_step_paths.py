"""The fast paths of the optimizer step (issue 14) against plain per-tensor arithmetic.

* 8-bit moments, torch path (CUDA; CPU with ``FUSED_CPU_STEP`` off): the packed, chunked
  update equals dequantise → Adam → quantise tensor by tensor, bit for bit, and does not
  depend on where the chunks fall;
* 8-bit moments, fused CPU kernel (the CPU default): the same algorithm; its log2 differs
  from torch's, so a code may land one level over at a rounding boundary (counted, bounded)
  and parameters agree to float tolerance;
* projected weights: back-projection, weight decay and the add in one GEMM equal
  the unfused update, for channels-last kernels too (tests/test_optim_channels_last.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from tests.helpers.models import TinyNet
from tests.helpers.optim import clone_model, mse_steps, tiny_batch
from torch import nn

import training.optim.lowrank as lowrank
from training.optim import AdamW8bit, COAPAdamW
from training.optim import projection as proj
from training.optim.quant8 import dequantize_blockwise, quantize_blockwise

PROJECTED = dict(min_numel=0, update_interval=2, reproject_factor=2)


@pytest.fixture
def torch_path(monkeypatch):
    """Run 8-bit steps on the torch path (PackedMoments) on the CPU, as on CUDA."""
    monkeypatch.setattr(lowrank, "FUSED_CPU_STEP", False)


def _reference_adamw8bit(model, steps, lr=1e-2, wd=1e-2, betas=(0.9, 0.999), eps=1e-8, bs=256):
    """AdamW8bit written out tensor by tensor with the public quantiser (the algorithm the fast path must match)."""
    state = {}
    for i in range(steps):
        x, y = tiny_batch(i)
        model.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                s = state.setdefault(p, {"step": 0, "m": quantize_blockwise(torch.zeros_like(p), True, bs),
                                         "v": quantize_blockwise(torch.zeros_like(p), False, bs)})  # fmt: skip
                s["step"] += 1
                m, v = dequantize_blockwise(*s["m"], bs), dequantize_blockwise(*s["v"], bs)
                m.lerp_(p.grad, 1 - betas[0])
                v.mul_(betas[1]).addcmul_(p.grad, p.grad, value=1 - betas[1])
                s["m"], s["v"] = quantize_blockwise(m, True, bs), quantize_blockwise(v, False, bs)
                denom = v.sqrt().div_(math.sqrt(1 - betas[1] ** s["step"])).add_(eps)
                p.mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - betas[0] ** s["step"]))
    return state


@pytest.mark.parametrize(
    "chunk, block_size, in_place",
    [(256, 256, 1 << 14), (1 << 16, 256, 1 << 14), (256, 16, 16), (1 << 16, 16, 16)],
    ids=["one-block-chunks", "64Ki-chunks", "in-place-multi-chunk", "in-place-one-chunk"],
)
def test_packed_8bit_step_equals_the_per_tensor_algorithm(monkeypatch, torch_path, chunk, block_size, in_place):
    """Chunks of one block (every tensor split across chunks) and of many tensors give the reference's bits.

    With 16-value blocks the conv and linear weights (432 and 560 values) are updated in their own
    state tensors and the rest packed, so both paths run in one step.
    """
    monkeypatch.setattr(lowrank, "CHUNK_NUMEL", chunk)
    monkeypatch.setattr(lowrank, "IN_PLACE_NUMEL", in_place)
    torch.manual_seed(0)
    ref = TinyNet()
    model = clone_model(ref)
    state = _reference_adamw8bit(ref, 4, bs=block_size)
    opt = AdamW8bit(model.parameters(), lr=1e-2, weight_decay=1e-2, block_size=block_size)
    mse_steps(model, opt, 4)
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(state[p]["m"][0], opt.state[q]["exp_avg"])
        assert torch.equal(state[p]["v"][1], opt.state[q]["exp_avg_sq_absmax"])


def test_coap8bit_does_not_depend_on_the_chunking(monkeypatch, torch_path):
    """Across correlation updates and re-projections (which decode the first moment in full and move it)."""
    torch.manual_seed(0)
    a = TinyNet()
    b = clone_model(a)
    opt_a = COAPAdamW(a.parameters(), lr=1e-2, rank=2, eight_bit=True, **PROJECTED)
    mse_steps(a, opt_a, 9)
    monkeypatch.setattr(lowrank, "CHUNK_NUMEL", 1)  # one block per chunk
    opt_b = COAPAdamW(b.parameters(), lr=1e-2, rank=2, eight_bit=True, **PROJECTED)
    mse_steps(b, opt_b, 9)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]) if torch.is_tensor(value) else value == opt_b.state[q][key]


def test_coap8bit_in_place_moments_equal_packed_ones(monkeypatch, torch_path):
    """Moments updated in their own tensors (4-value blocks: every projected moment is block-aligned) equal packed ones,
    across the projection moves that decode and transfer the first moment."""
    torch.manual_seed(0)
    a = TinyNet()
    b = clone_model(a)
    opt_a = COAPAdamW(a.parameters(), lr=1e-2, rank=2, eight_bit=True, block_size=4, **PROJECTED)
    mse_steps(a, opt_a, 9)
    monkeypatch.setattr(lowrank, "IN_PLACE_NUMEL", 1)
    monkeypatch.setattr(lowrank, "CHUNK_NUMEL", 8)  # two blocks per chunk: in-place tensors take several chunks
    opt_b = COAPAdamW(b.parameters(), lr=1e-2, rank=2, eight_bit=True, block_size=4, **PROJECTED)
    mse_steps(b, opt_b, 9)
    assert any(s["exp_avg"].numel() % 4 == 0 and s["exp_avg"].numel() > 8 for s in opt_b.state.values())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]) if torch.is_tensor(value) else value == opt_b.state[q][key]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
def test_8bit_bf16_and_non_contiguous_parameters_take_the_returned_update(monkeypatch, fused):
    """Parameters the 8-bit update cannot write in place still get the same update."""
    monkeypatch.setattr(lowrank, "FUSED_CPU_STEP", fused)
    torch.manual_seed(0)
    base = nn.Linear(40, 30)
    ref, odd = clone_model(base), clone_model(base)
    with torch.no_grad():  # same values, transposed storage
        odd.weight = nn.Parameter(odd.weight.detach().T.contiguous().T)
    assert not odd.weight.is_contiguous()
    x = torch.randn(8, 40)
    for m in (ref, odd):
        opt = AdamW8bit(m.parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    torch.testing.assert_close(odd.weight, ref.weight, rtol=1e-6, atol=1e-7)


def test_fused_back_projection_equals_back_projection_then_decay_and_add():
    g = torch.Generator().manual_seed(0)
    w, r, p = torch.randn(12, 5, generator=g), torch.randn(12, 3, generator=g), torch.randn(3, 5, generator=g)
    fused = w.clone()
    proj.matrix_back_add_(fused, r, p, 0.9, transposed=False)
    torch.testing.assert_close(fused, 0.9 * w + proj.matrix_back(r, p), rtol=1e-6, atol=1e-6)
    wt = torch.randn(5, 12, generator=g)  # a matrix stored transposed (rows < cols)
    fused = wt.clone()
    proj.matrix_back_add_(fused, r, p, 0.9, transposed=True)
    torch.testing.assert_close(fused, 0.9 * wt + proj.matrix_back(r, p).T, rtol=1e-6, atol=1e-6)
    conv = torch.randn(8, 6, 3, 3, generator=g)
    u0, u1 = torch.linalg.qr(torch.randn(8, 3, generator=g))[0], torch.linalg.qr(torch.randn(6, 2, generator=g))[0]
    core = torch.randn(3, 2, 3, 3, generator=g)
    fused = conv.clone()
    proj.tucker_back_add_(fused, core, u0, u1, 0.9)
    expected = 0.9 * conv + torch.einsum("rskl,or,is->oikl", core, u0, u1)
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(proj.tucker_project(conv, u0, u1), torch.einsum("oikl,or,is->rskl", conv, u0, u1))


def test_channels_last_weights_agree_through_forward_and_backward():
    torch.manual_seed(0)
    a = TinyNet()
    b = clone_model(a).to(memory_format=torch.channels_last)
    assert not b.conv.weight.is_contiguous()
    opt_a = COAPAdamW(a.parameters(), lr=1e-2, rank=2, **PROJECTED)
    opt_b = COAPAdamW(b.parameters(), lr=1e-2, rank=2, **PROJECTED)
    mse_steps(a, opt_a, 5)
    mse_steps(b, opt_b, 5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
