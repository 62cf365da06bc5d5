"""The fused CPU kernel of the 8-bit Adam step against the torch quantiser it replaces on the CPU.

The kernel's log2 is a series, torch's a vector library's: the two may round a value lying
within ~1e-6 of a boundary between two levels to neighbouring codes. Everything else —
the grid, the absmax per block, the decoded values, Adam's arithmetic — is the same, so:
codes equal but for a few one-level steps, scales and parameters equal to float rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.helpers.models import TinyNet
from tests.helpers.optim import clone_model, mse_steps

import training.optim.lowrank as lowrank
from training.optim import AdamW8bit, COAPAdamW
from training.optim import fused8bit
from training.optim.quant8 import dequantize_blockwise, encode_blocks, quantize_blockwise

BETAS, EPS, LR, WD = (0.9, 0.999), 1e-8, 1e-2, 1e-2
#: codes the kernel may place one level off torch's (values at a rounding boundary): at most this share
BOUNDARY_SHARE = 1e-4


def _wide(n: int, signed: bool, gen: torch.Generator, zeros_every: int = 97) -> torch.Tensor:
    """Magnitudes over ~8 decades (every level of the grid is used), some exact zeros."""
    x = torch.exp(torch.empty(n).uniform_(-18, 0, generator=gen))
    if signed:
        x = x * torch.sign(torch.randn(n, generator=gen))
    x[::zeros_every] = 0.0
    return x


def _assert_codes_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    off = (got.int() - expected.int()).abs()
    assert int(off.max()) <= 1, "a code more than one level from the torch quantiser's"
    assert int((off > 0).sum()) <= max(1, BOUNDARY_SHARE * got.numel())


def _reference_step(grad, m_pair, v_pair, param, block_size, step, m_float=None):
    """Dequantise → Adam → quantise with the public torch quantiser (the algorithm the kernel fuses)."""
    m = m_float.clone() if m_float is not None else dequantize_blockwise(*m_pair, block_size)
    v = dequantize_blockwise(*v_pair, block_size)
    m.lerp_(grad, 1 - BETAS[0])
    v.mul_(BETAS[1]).addcmul_(grad, grad, value=1 - BETAS[1])
    denom = v.sqrt().div_(math.sqrt(1 - BETAS[1] ** step)).add_(EPS)
    update = m / denom * (-LR / (1 - BETAS[0] ** step))
    return quantize_blockwise(m, True, block_size), quantize_blockwise(v, False, block_size), update


@pytest.mark.parametrize("n, block_size", [(65536 + 100, 256), (1000, 16)], ids=["256-blocks", "16-blocks"])
@pytest.mark.parametrize("apply_to_target", [True, False], ids=["parameter", "update"])
@pytest.mark.parametrize("from_float", [False, True], ids=["from-codes", "from-float-m"])
def test_kernel_step_equals_the_torch_quantiser(n, block_size, apply_to_target, from_float):
    """One step from a quantised state; the last block is short; an all-zero block stays zero."""
    gen = torch.Generator().manual_seed(0)
    grad = _wide(n, True, gen) * 1e-2
    m0, v0 = _wide(n, True, gen) * 1e-3, _wide(n, False, gen) * 1e-5
    grad[:block_size] = m0[:block_size] = v0[:block_size] = 0.0  # block 0: all zero
    m_pair, v_pair = quantize_blockwise(m0, True, block_size), quantize_blockwise(v0, False, block_size)
    m_float = m0 * 1.01 if from_float else None  # as after a moment transfer: not on the grid
    param = torch.randn(n, generator=gen)
    step, decay = 3, 1 - LR * WD
    (m_ref, ma_ref), (v_ref, va_ref), update_ref = _reference_step(grad, m_pair, v_pair, param, block_size, step, m_float)

    state = {"exp_avg": m_pair[0].clone(), "exp_avg_absmax": m_pair[1].clone(),
             "exp_avg_sq": v_pair[0].clone(), "exp_avg_sq_absmax": v_pair[1].clone()}  # fmt: skip
    target = param.clone() if apply_to_target else torch.full((n,), float("nan"))  # an update buffer is not read
    step_size = -LR / (1 - BETAS[0] ** step)
    fused8bit.adam_8bit_(state, grad, target, m_float, block_size, *BETAS, EPS, step, step_size, decay, apply_to_target)

    _assert_codes_close(state["exp_avg"], m_ref)
    _assert_codes_close(state["exp_avg_sq"], v_ref)
    torch.testing.assert_close(state["exp_avg_absmax"], ma_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(state["exp_avg_sq_absmax"], va_ref, rtol=1e-6, atol=0)
    expected = param * decay + update_ref if apply_to_target else update_ref
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-7)
    assert (state["exp_avg"][:block_size] == 0).all() and (state["exp_avg_sq"][:block_size] == 1).all()
    assert state["exp_avg_absmax"][0] == 0 and state["exp_avg_sq_absmax"][0] == 0


@pytest.mark.parametrize("signed", [True, False])
def test_kernel_encoder_puts_every_grid_level_on_its_code(signed):
    """Each level of quant8's grid (absmax 1) encodes to its own code; wide-range values as torch's encoder
    but for boundary steps."""
    levels, log2_min = (127, -20.0) if signed else (255, -32.0)
    k = torch.arange(-127 if signed else 1, levels + 1, dtype=torch.float32)
    level = torch.exp2((levels - k.abs()) * (log2_min / (levels - 1))) * torch.sign(k)
    grid_m, grid_v = fused8bit.coding()[2:]
    codes = np.empty(k.numel(), np.int8 if signed else np.uint8)
    absmax = fused8bit._encode(level.numpy(), codes, grid_m if signed else grid_v, signed)
    assert absmax == 1.0 and torch.equal(torch.from_numpy(codes).float(), k)

    x = _wide(256 * 64, signed, torch.Generator().manual_seed(1)).view(64, 256)
    expected, scales = encode_blocks(x, signed)
    got = torch.empty_like(expected)
    for row in range(64):
        scale = fused8bit._encode(x[row].numpy(), got[row].numpy(), grid_m if signed else grid_v, signed)
        assert scale == scales[row]
    _assert_codes_close(got, expected)


def test_kernel_log2_is_float32_accurate():
    """Over the normal float32 range, every power of two exact, and around the mantissa's split at √2."""
    rng = np.random.default_rng(0)
    x = np.concatenate([
        np.exp(rng.uniform(-87, 88, 2000)),
        2.0 ** np.arange(-126, 128),
        np.sqrt(2) * (1 + np.linspace(-1e-6, 1e-6, 21)), 1 + np.linspace(-1e-6, 1e-6, 21),
    ]).astype(np.float32)  # fmt: skip
    got = np.array([fused8bit._log2(v) for v in x], dtype=np.float64)
    exact = np.log2(x.astype(np.float64))
    # two float32 rounding steps of the result, or 2e-7 near log2 = 0 (where ulps shrink to nothing)
    assert (np.abs(got - exact) <= np.maximum(2 * np.spacing(np.abs(exact).astype(np.float32)), 2e-7)).all()
    assert (got[2000:2254] == np.arange(-126, 128)).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: AdamW8bit(ps, lr=LR, weight_decay=WD),
        lambda ps: COAPAdamW(ps, lr=LR, rank=2, eight_bit=True, min_numel=0, update_interval=2, reproject_factor=2),
        lambda ps: AdamW8bit(ps, lr=LR, weight_decay=WD, block_size=16),
    ],
    ids=["adamw8bit", "coap8bit-across-projection-moves", "adamw8bit-16-blocks"],
)
def test_fused_optimizer_tracks_the_torch_path(monkeypatch, make):
    torch.manual_seed(0)
    a = TinyNet()
    b = clone_model(a)
    opt_fused = make(list(a.parameters()))
    mse_steps(a, opt_fused, 9)
    monkeypatch.setattr(lowrank, "FUSED_CPU_STEP", False)
    opt_torch = make(list(b.parameters()))
    mse_steps(b, opt_torch, 9)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            _assert_codes_close(opt_fused.state[p][key], opt_torch.state[q][key])


def test_channels_last_parameters_and_gradients_agree_with_contiguous_ones():
    """The kernel reads a channels-last gradient and writes the channels-last parameter in the codes' (logical)
    order (same gradients, bit for bit: tests/test_optim_channels_last.py)."""
    torch.manual_seed(0)
    a = TinyNet()
    b = clone_model(a).to(memory_format=torch.channels_last)
    assert not b.conv.weight.is_contiguous()
    opt_a, opt_b = AdamW8bit(a.parameters(), lr=LR, block_size=16), AdamW8bit(b.parameters(), lr=LR, block_size=16)
    mse_steps(a, opt_a, 4)
    mse_steps(b, opt_b, 4)
    assert not b.conv.weight.grad.is_contiguous()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)
        assert torch.equal(opt_a.state[p]["exp_avg"], opt_b.state[q]["exp_avg"].contiguous())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parameters_take_the_torch_path_and_agree_with_the_cpu_kernel():
    torch.manual_seed(0)
    cpu = torch.nn.Linear(64, 48)
    gpu = clone_model(cpu).cuda()
    x = torch.randn(16, 64)
    for model, inputs in ((cpu, x), (gpu, x.cuda())):
        opt = AdamW8bit(model.parameters(), lr=LR)
        for _ in range(3):
            opt.zero_grad()
            model(inputs).pow(2).mean().backward()
            opt.step()
        assert opt.state[model.weight]["exp_avg"].device == model.weight.device
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-4, atol=1e-6)
