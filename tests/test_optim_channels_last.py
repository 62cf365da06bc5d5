"""Channels-last parameters (the recipe's CPU layout) against contiguous ones, on the same gradients.

The layout is storage only: an optimizer must give a channels-last model the parameters it
gives a contiguous one, bit for bit where the update is elementwise (AdamW8bit, the ``adam``
layout of COAP; the 8-bit codes are kept in logical order, blocks and all) and to float
rounding where a Tucker projection multiplies in the other order. Its state must be the same
too, so that a checkpoint saved in one layout resumes exactly in the other.

Gradients are drawn, not back-propagated: a channels-last convolution's backward pass rounds
differently, which is not the optimizer's business.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.helpers.optim import roundtrip_state
from torch import nn

import training.optim.lowrank as lowrank
from training.optim import ProjectedAdamW, build_optimizer
from training.optim import fused8bit
from training.optim import projection as proj

PROJECTED = dict(update_interval=2, reproject_factor=2)
OPTIMIZERS = {
    "adamw": {},
    "adamw8bit": {},
    "adamw8bit-16-blocks": {"block_size": 16},
    "coap": PROJECTED,
    "coap8bit": PROJECTED,
    "coap-all-projected": {**PROJECTED, "min_numel": 0},  # the 3×3 kernels take Tucker factors
    "coap8bit-all-projected": {**PROJECTED, "min_numel": 0},
}
#: the cases whose every update is elementwise in each value (no product over a channel mode)
ELEMENTWISE = {"adamw", "adamw8bit", "adamw8bit-16-blocks", "coap", "coap8bit"}


def _net() -> nn.Module:
    """3×3 kernels of 8640 values (33¾ blocks of 256: a short last block) and 288, a 1×1 kernel, a Linear, biases."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(24, 40, 3), nn.Conv2d(40, 16, 1), nn.Conv2d(4, 8, 3), nn.Linear(30, 20))


def _optimizer(case: str, model: nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(case.split("-")[0], model.parameters(), lr=1e-2, weight_decay=1e-2, **OPTIMIZERS[case])


def _steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    """``steps`` optimizer steps on seeded random gradients, each laid out as its parameter (as autograd does)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))
        opt.step()


def _assert_same(a: nn.Module, b: nn.Module, case: str, exact: bool) -> None:
    """Bit for bit when ``exact``; else steps of ~1e-2 (lr) a float rounding apart, or, with 8-bit moments
    behind a projection, a code one level (~12%) apart in a few values where that rounding met a level boundary."""
    for p, q in zip(a.parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), f"{case}: {tuple(p.shape)} differs"
        else:
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-4 if "8bit" in case and case not in ELEMENTWISE else 1e-6)


def _assert_same_state(opt_a, opt_b, a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
            if key in sa:
                assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(params=[True, False], ids=["fused-kernel", "torch-path"])
def fused(request, monkeypatch):
    monkeypatch.setattr(lowrank, "FUSED_CPU_STEP", request.param)
    return request.param


@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_channels_last_model_gets_the_contiguous_models_parameters(case, fused):
    """Across projection moves (every 2 steps) and re-projections (every 4). The torch path of the 8-bit
    moments (CUDA's) writes only row-major parameters in place; a channels-last one takes the returned
    update, a rounding apart."""
    nchw = _net()
    cl = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    assert proj.is_channels_last(cl[0].weight) and proj.is_channels_last(cl[2].weight)
    opt_nchw, opt_cl = _optimizer(case, nchw), _optimizer(case, cl)
    _steps(nchw, opt_nchw, 9)
    _steps(cl, opt_cl, 9)
    _assert_same(nchw, cl, case, exact=case in ELEMENTWISE and (fused or "8bit" not in case))
    assert proj.is_channels_last(cl[0].weight)  # updated where it lies
    if case in ELEMENTWISE:
        _assert_same_state(opt_nchw, opt_cl, nchw, cl)  # the 8-bit codes in logical order, blocks and all


@pytest.mark.parametrize("case", list(OPTIMIZERS))
@pytest.mark.parametrize("saved_in, resumed_in", [("cl", "nchw"), ("nchw", "cl")], ids=["cl-to-nchw", "nchw-to-cl"])
def test_a_checkpoint_resumes_exactly_in_the_other_layout(case, saved_in, resumed_in):
    """Train 5 steps in one layout, save, load into the other and train 4 more: as 9 steps without stopping."""
    formats = {"cl": torch.channels_last, "nchw": torch.contiguous_format}
    whole = _net().to(memory_format=formats[saved_in])
    opt_whole = _optimizer(case, whole)
    _steps(whole, opt_whole, 5)
    stopped = copy.deepcopy(whole)
    saved = roundtrip_state(opt_whole)
    _steps(whole, opt_whole, 4, seed=2)

    resumed = _net().to(memory_format=formats[resumed_in])
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), stopped.parameters()):
            p.copy_(q)
    opt_resumed = _optimizer(case, resumed)
    opt_resumed.load_state_dict(saved)
    for p in resumed.parameters() if isinstance(opt_resumed, ProjectedAdamW) else []:  # (torch's AdamW keeps the saved strides)
        for key in ("exp_avg", "exp_avg_sq"):  # float moments follow the parameter they now belong to
            moment = opt_resumed.state[p][key]
            if moment.dtype == torch.float32 and moment.shape == p.shape and p.dim() == 4:
                assert moment.stride() == p.stride()
    _steps(resumed, opt_resumed, 4, seed=2)
    _assert_same(whole, resumed, case, exact=case in ELEMENTWISE)


@pytest.mark.parametrize("shape", [(6, 20, 3, 3), (16, 3, 3, 3), (10, 80, 3, 3)], ids=["ragged", "rgb-input", "units"])
def test_kernel_updates_a_channels_last_tensor_in_its_memory_order(shape):
    """The channels-last kernel (codes in the parameter's memory order, blocks in logical order) gives the
    codes, scales and values of the row-major one, bit for bit: blocks across output channels, a short
    last block, units of several output channels (80·9 values: units of lcm(720, 64) = 2880, 4 channels; the last
    unit holds 2)."""
    gen = torch.Generator().manual_seed(0)
    bs = 64
    grad, param = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    blocks = -(-grad.numel() // bs)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        state = {"exp_avg": torch.zeros(shape, dtype=torch.int8).contiguous(memory_format=fmt),
                 "exp_avg_absmax": torch.zeros(blocks),
                 "exp_avg_sq": torch.ones(shape, dtype=torch.uint8).contiguous(memory_format=fmt),
                 "exp_avg_sq_absmax": torch.zeros(blocks)}  # fmt: skip
        g, target = grad.clone(memory_format=fmt), param.clone(memory_format=fmt)
        for step in (1, 2, 3):
            fused8bit.adam_8bit_(state, g * step, target, None, bs, 0.9, 0.999, 1e-8, step, -1e-2, 0.999, True)
        results.append((state, target))
    (s_nchw, t_nchw), (s_cl, t_cl) = results
    assert proj.is_channels_last(t_cl) and proj.is_channels_last(s_cl["exp_avg"])
    assert torch.equal(t_nchw, t_cl)
    for key, value in s_nchw.items():
        assert torch.equal(value, s_cl[key]), key


def test_tucker_products_of_a_channels_last_kernel():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(8, 6, 3, 3, generator=gen)
    u0, u1 = torch.linalg.qr(torch.randn(8, 3, generator=gen))[0], torch.linalg.qr(torch.randn(6, 2, generator=gen))[0]
    g_cl = g.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(proj.tucker_project(g_cl, u0, u1), proj.tucker_project(g, u0, u1), rtol=1e-6, atol=1e-6)
    core = torch.randn(3, 2, 3, 3, generator=gen)
    w, w_cl = g.clone(), g_cl.clone()
    proj.tucker_back_add_(w, core, u0, u1, 0.9)
    proj.tucker_back_add_(w_cl, core, u0, u1, 0.9)
    assert proj.is_channels_last(w_cl)
    torch.testing.assert_close(w_cl, w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w, 0.9 * g + torch.einsum("rskl,or,is->oikl", core, u0, u1), rtol=1e-6, atol=1e-6)
    assert not proj.is_channels_last(torch.randn(4, 5, 1, 1).contiguous(memory_format=torch.channels_last))  # row-major too
