"""Optimizer-in-backward and the build_optimizer registry."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.models import TinyNet
from tests.helpers.optim import clone_model, mse_steps, roundtrip_state, tiny_batch

from models.errors import ConfigError, NotFoundError
from training.optim import (
    COAPAdamW,
    InBackwardOptimizer,
    build_optimizer,
    check_in_backward_compatible,
    list_optimizers,
    optimizer_in_backward,
)


@pytest.mark.parametrize("name,kw", [("adamw", {}), ("coap", {"min_numel": 0, "rank": 2, "update_interval": 2})])
def test_in_backward_equals_a_normal_step(name, kw):
    torch.manual_seed(0)
    ref = TinyNet()
    model = clone_model(ref)
    opt_ref = build_optimizer(name, ref.parameters(), lr=1e-2, **kw)
    opt = build_optimizer(name, model.parameters(), lr=1e-2, in_backward=True, model=model, **kw)
    assert isinstance(opt, InBackwardOptimizer)
    mse_steps(ref, opt_ref, 5)
    for i in range(5):
        x, y = tiny_batch(i)
        (model(x) - y).pow(2).mean().backward()
        assert all(p.grad is None for p in model.parameters())  # stepped and freed inside backward
        opt.step()  # a no-op the loop may still call
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_in_backward_refuses_accumulation_and_clipping():
    model = TinyNet()
    with pytest.raises(ConfigError, match="accumulate"):
        build_optimizer("adamw", model.parameters(), in_backward=True, model=model, accumulate=4)
    with pytest.raises(ConfigError, match="clip"):
        optimizer_in_backward(model, lambda ps: torch.optim.AdamW(ps), clip_grad_norm=1.0)
    with pytest.raises(ConfigError, match="accumulate"):
        check_in_backward_compatible(accumulate=2)
    check_in_backward_compatible(accumulate=1, clip_grad_norm=None)
    check_in_backward_compatible(accumulate=1, clip_grad_norm=0.0)


def test_in_backward_state_dict_scheduler_and_remove():
    torch.manual_seed(0)
    model = TinyNet()
    opt = build_optimizer("coap", model.parameters(), lr=1e-2, in_backward=True, model=model, min_numel=0, rank=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mse_steps(model, opt, 2, scheduler=sched)
    assert {g["lr"] for g in opt.param_groups} == {2.5e-3}
    assert len(opt.state) == len(list(model.parameters()))
    state = roundtrip_state(opt)
    assert "conv.weight" in state
    other = clone_model(model)
    resumed = build_optimizer("coap", other.parameters(), lr=1e-2, in_backward=True, model=other, min_numel=0, rank=2)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.optimizers["conv.weight"].state[other.conv.weight]["proj_out"],
                       opt.optimizers["conv.weight"].state[model.conv.weight]["proj_out"])  # fmt: skip
    opt.remove()
    x, y = tiny_batch(0)
    (model(x) - y).pow(2).mean().backward()
    assert model.fc.weight.grad is not None


def test_registry_names_and_errors():
    assert list_optimizers() == ["adamw", "coap", "coap8bit", "galore", "adamw8bit"]
    model = TinyNet()
    assert isinstance(build_optimizer("adamw", model.parameters()), torch.optim.AdamW)
    opt = build_optimizer("coap8bit", model.parameters(), rank_ratio_cnn=8)
    assert isinstance(opt, COAPAdamW) and opt.defaults["eight_bit"] and opt.defaults["rank_ratio_cnn"] == 8
    with pytest.raises(NotFoundError, match="adamw, coap, coap8bit, galore, adamw8bit"):
        build_optimizer("lion", model.parameters())
    with pytest.raises(ConfigError, match="does not take rank"):
        build_optimizer("adamw", model.parameters(), rank=4)
