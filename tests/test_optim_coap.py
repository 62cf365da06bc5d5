"""COAPAdamW / GaLoreAdamW / AdamW8bit: equivalence with AdamW, convergence, exact resume, settings."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.models import TinyNet
from tests.helpers.optim import clone_model, mse_steps, regression_problem, roundtrip_state, tiny_batch
from torch import nn

from models.errors import ConfigError
from training.optim import AdamW8bit, COAPAdamW, GaLoreAdamW, build_optimizer

PROJECTED = dict(min_numel=0, update_interval=2, reproject_factor=2)


def _pair():
    """A TinyNet for AdamW and an identical one for the optimizer under test."""
    torch.manual_seed(0)
    ref = TinyNet()
    return ref, clone_model(ref)


def test_layouts_cover_matrix_tucker_and_adam():
    model = TinyNet()
    opt = COAPAdamW(model.parameters(), min_numel=0, rank=2)
    group = opt.param_groups[0]
    assert opt.layout(model.conv.weight, group) == ("tucker", (2, 2))
    assert opt.layout(model.point.weight, group)[0] == "matrix"  # 1×1 conv is a matrix
    assert opt.layout(model.fc.weight, group) == ("matrix", (80, 7, 2, True))  # transposed: 7×80 -> 80×7
    assert opt.layout(model.fc.bias, group) == ("adam", ())
    galore = GaLoreAdamW(model.parameters(), min_numel=0)
    assert galore.layout(model.conv.weight, galore.param_groups[0])[0] == "matrix"
    # tiny tensors take plain AdamW with the default threshold
    default = COAPAdamW(model.parameters())
    assert default.layout(model.conv.weight, default.param_groups[0]) == ("adam", ())


@pytest.mark.parametrize("cls", [COAPAdamW, GaLoreAdamW])
def test_full_rank_identity_projection_equals_adamw(cls):
    ref, model = _pair()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1, rank=10_000, **PROJECTED)
    mse_steps(ref, opt_ref, 9)
    mse_steps(model, opt, 9)  # 9 steps: past several update / re-projection points
    assert torch.equal(opt.state[model.conv.weight]["proj_out"], torch.eye(8)) if cls is COAPAdamW else True
    assert "proj" in opt.state[model.fc.weight]
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_param_groups_weight_decay_scheduler_and_clipping_like_adamw():
    ref, model = _pair()

    def groups(m):
        return [
            {"params": [m.conv.weight, m.fc.weight], "lr": 2e-2, "weight_decay": 0.2},
            {"params": [m.conv.bias, m.point.weight, m.fc.bias], "lr": 5e-3, "weight_decay": 0.0},
        ]

    opt_ref = torch.optim.AdamW(groups(ref), lr=1e-2)
    opt = COAPAdamW(groups(model), lr=1e-2, rank=10_000, **PROJECTED)
    sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, step_size=2, gamma=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def clip(m):
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)

    mse_steps(ref, opt_ref, 6, closure_hook=clip, scheduler=sched_ref)
    mse_steps(model, opt, 6, closure_hook=clip, scheduler=sched)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt_ref.param_groups]
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_low_rank_weight_decay_is_decoupled():
    model = TinyNet()
    opt = COAPAdamW(model.parameters(), lr=0.1, weight_decay=0.5, rank=2, min_numel=0)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p, b * (1 - 0.1 * 0.5))


def _fit(name, steps=300, **kw):
    x, y, student = regression_problem()
    model = student()
    opt = build_optimizer(name, model.parameters(), lr=3e-3, weight_decay=0.0, **kw)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_regression_loss_stays_close_to_adamw_with_galore_beside():
    """Tolerance: final loss within 5% of the initial loss of AdamW's, the curve within 8% after step 100,
    and no worse than 1.25× GaLore's.

    At rank ratio 2 half of each gradient's directions are dropped between projection
    updates, so COAP converges more slowly than AdamW on this small full-rank problem
    (300 steps from 3.39: AdamW 0.041, COAP 0.117, COAP-8bit 0.108, GaLore 0.147; the largest
    gap to AdamW's curve after step 100 is 3.5% of the initial loss); what must hold is that it
    tracks AdamW's curve to a small fraction of the loss scale and is at least as good as GaLore.
    """
    low = dict(rank_ratio_matrix=2, min_numel=0)
    adamw = _fit("adamw")
    coap = _fit("coap", update_interval=10, reproject_factor=3, **low)
    galore = _fit("galore", update_interval=20, **low)
    coap8 = _fit("coap8bit", update_interval=10, reproject_factor=3, **low)
    scale = adamw[0]
    for curve in (coap, coap8):
        assert abs(curve[-1] - adamw[-1]) <= 0.05 * scale
        assert curve[-1] <= 1.25 * galore[-1]
        assert max(abs(a - c) for a, c in zip(adamw[100:], curve[100:])) <= 0.08 * scale


@pytest.mark.parametrize(
    "name,kw",
    [
        ("coap", PROJECTED | {"rank": 2}),
        ("coap8bit", PROJECTED | {"rank": 2}),
        ("galore", {"min_numel": 0, "rank": 2, "update_interval": 3}),
        ("adamw8bit", {}),
    ],
)
def test_state_dict_resume_is_bit_exact(name, kw):
    torch.manual_seed(0)
    model = TinyNet()
    opt = build_optimizer(name, model.parameters(), lr=1e-2, **kw)
    mse_steps(model, opt, 5)
    state = roundtrip_state(opt)  # weights_only=True: tensors and plain numbers only
    resumed_model = clone_model(model)
    resumed = build_optimizer(name, resumed_model.parameters(), lr=1e-2, **kw)
    resumed.load_state_dict(state)
    mse_steps(model, opt, 6, seed=100)  # crosses correlation updates and a randomised SVD
    mse_steps(resumed_model, resumed, 6, seed=100)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        for key, value in opt.state[p].items():
            other = resumed.state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
            if torch.is_tensor(value):
                assert value.dtype == other.dtype


def test_same_gradients_give_identical_projections_on_every_rank():
    """DDP: ranks see the same averaged gradient, so each must compute the same projection and state."""
    torch.manual_seed(0)
    a = TinyNet()
    b = clone_model(a)
    opt_a = COAPAdamW(a.parameters(), rank=3, **PROJECTED)
    opt_b = COAPAdamW(b.parameters(), rank=3, **PROJECTED)
    mse_steps(a, opt_a, 9)
    mse_steps(b, opt_b, 9)
    for p, q in zip(a.parameters(), b.parameters()):
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]) if torch.is_tensor(value) else value == opt_b.state[q][key]
    # a different seed draws a different sketch
    c = clone_model(a)
    opt_c = COAPAdamW(c.parameters(), rank=3, seed=1, **PROJECTED)
    mse_steps(c, opt_c, 1)
    assert not torch.equal(opt_c.state[c.conv.weight]["proj_out"], opt_a.state[a.conv.weight]["proj_out"])


def test_bf16_autocast_and_bf16_params_keep_fp32_moments():
    """bf16 autocast and bf16 weights follow the fp32 run within bf16 rounding; moments stay fp32."""
    torch.manual_seed(0)
    model = TinyNet()
    ref = clone_model(model)
    start = [p.detach().clone() for p in model.parameters()]
    opt = COAPAdamW(model.parameters(), rank=2, **PROJECTED)
    opt_ref = COAPAdamW(ref.parameters(), rank=2, **PROJECTED)
    for i in range(3):
        x, y = tiny_batch(i)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (model(x).float() - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert loss.item() == pytest.approx(mse_steps(ref, opt_ref, 1, seed=i)[0], rel=1e-2)  # measured 3e-4
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    update = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)])
    update_ref = torch.cat([(p.detach() - s).flatten() for p, s in zip(ref.parameters(), start)])
    assert float((update - update_ref).norm() / update_ref.norm()) < 0.05  # measured 0.010

    torch.manual_seed(0)
    half = TinyNet()
    full = clone_model(half)
    half = half.to(torch.bfloat16)
    opt = COAPAdamW(half.parameters(), rank=2, **PROJECTED)
    x, y = tiny_batch(0)
    (half(x.bfloat16()).float() - y).pow(2).mean().backward()
    opt.step()
    mse_steps(full, COAPAdamW(full.parameters(), rank=2, **PROJECTED), 1)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in half.parameters())
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    for p, q in zip(half.parameters(), full.parameters()):  # measured: at most 2**-7 relative (two bf16 roundings)
        torch.testing.assert_close(p.float(), q.detach(), rtol=2**-6, atol=1e-4)
    resumed = COAPAdamW(half.parameters(), rank=2, **PROJECTED)
    resumed.load_state_dict(roundtrip_state(opt))  # load keeps fp32 moments for bf16 params
    assert resumed.state[half.fc.weight]["exp_avg"].dtype == torch.float32


def test_eight_bit_state_is_int8_and_smaller():
    torch.manual_seed(0)
    model = TinyNet()
    opt = COAPAdamW(model.parameters(), rank=2, eight_bit=True, **PROJECTED)
    mse_steps(model, opt, 2)
    st = opt.state[model.conv.weight]
    assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_sq"].dtype == torch.uint8
    assert st["exp_avg"].shape == (2, 2, 3, 3)
    opt8 = AdamW8bit(model.parameters())
    mse_steps(model, opt8, 1)
    assert opt8.state[model.fc.weight]["exp_avg"].dtype == torch.int8


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"rank": 0}, "rank"),
        ({"rank": -3}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank_ratio_matrix": 0.5}, "rank_ratio_matrix"),
        ({"rank_ratio_cnn": 0.9}, "rank_ratio_cnn"),
        ({"update_interval": 0}, "update_interval"),
        ({"reproject_factor": -1}, "reproject_factor"),
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
    ],
)
def test_bad_settings_raise_config_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        COAPAdamW(TinyNet().parameters(), **kw)


def test_bad_settings_in_a_later_param_group_and_empty_params():
    model = TinyNet()
    with pytest.raises(ConfigError, match="empty parameter list"):
        COAPAdamW([])
    with pytest.raises(ConfigError, match="empty parameter list"):
        build_optimizer("galore", iter([]))
    with pytest.raises(ConfigError, match="update_interval"):
        COAPAdamW([{"params": [model.fc.weight]}, {"params": [model.fc.bias], "update_interval": 0}])


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = COAPAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ConfigError, match="sparse"):
        opt.step()


def test_tucker_ranks_fit_narrow_kernels():
    """Regression: an 8x256x3x3 kernel (a LoRA-A conv in the head) unfolds to 256 x 72 on the input mode;
    the Tucker rank must not exceed 72, else the first step failed with a shape mismatch."""
    from training.optim import build_optimizer

    p = torch.nn.Parameter(torch.randn(8, 256, 3, 3))
    opt = build_optimizer("coap", [p], lr=1e-3)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    kind, (r0, r1) = opt.layout(p, opt.param_groups[0])
    assert kind == "tucker" and r0 <= 8 and r1 <= 8 * 3 * 3
    assert torch.isfinite(p).all()
