"""training.schedule: linear warmup, then cosine decay to ``min_ratio``; the LambdaLR resumes exactly from its state_dict."""

from __future__ import annotations

import io
import math

import pytest
import torch

from training.schedule import build_scheduler, warmup_cosine_factor


def test_warmup_is_linear_from_one_over_warmup_to_one():
    assert [warmup_cosine_factor(s, total_steps=20, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("min_ratio", [0.0, 0.01, 0.2])
def test_cosine_after_warmup_ends_at_min_ratio(min_ratio):
    total, warmup = 24, 4  # 20 decay steps
    f = lambda s: warmup_cosine_factor(s, total, warmup, min_ratio)  # noqa: E731
    assert f(warmup) == pytest.approx(1.0)
    assert f(warmup + 5) == pytest.approx(min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(warmup + 10) == pytest.approx(min_ratio + (1 - min_ratio) * 0.5)  # half way: the mean of 1 and the floor
    assert f(total) == pytest.approx(min_ratio)
    assert f(total + 100) == pytest.approx(min_ratio)  # clamped, never climbs back
    decay = [f(s) for s in range(warmup, total + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_no_warmup_starts_at_full_lr_and_short_runs_do_not_divide_by_zero():
    assert warmup_cosine_factor(0, total_steps=10, warmup_steps=0) == pytest.approx(1.0)
    assert warmup_cosine_factor(0, total_steps=1, warmup_steps=1) == pytest.approx(1.0)
    assert warmup_cosine_factor(2, total_steps=1, warmup_steps=1, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(7, total_steps=2, warmup_steps=5) == pytest.approx(0.01)  # warmup longer than the run


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_scheduler_lr_at_each_step_matches_the_factor():
    opt = _opt(0.1)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, min_ratio=0.05)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.05, 0.1, 0.1])  # warmup 1/2, 2/2, then the top of the cosine
    assert lrs == pytest.approx([0.1 * warmup_cosine_factor(s, 10, 2, 0.05) for s in range(12)])
    assert lrs[-1] == pytest.approx(0.1 * 0.05)


def test_state_dict_round_trip_resumes_the_same_lrs():
    def run(steps, opt, sched):
        out = []
        for _ in range(steps):
            opt.step()
            sched.step()
            out.append(opt.param_groups[0]["lr"])
        return out

    opt = _opt()
    sched = build_scheduler(opt, total_steps=20, warmup_steps=5, min_ratio=0.01)
    uninterrupted = run(20, opt, sched)

    opt = _opt()
    sched = build_scheduler(opt, total_steps=20, warmup_steps=5, min_ratio=0.01)
    first = run(7, opt, sched)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)  # as train_state.pt stores it
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    opt2 = _opt()
    sched2 = build_scheduler(opt2, total_steps=20, warmup_steps=5, min_ratio=0.01)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(first[-1])
    assert first + run(13, opt2, sched2) == pytest.approx(uninterrupted)
