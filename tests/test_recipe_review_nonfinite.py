"""Review findings in the recipe's NaN handling: a non-finite gradient stops the run with clipping off too."""

from __future__ import annotations

import pytest

import training.recipe as recipe
from tests.helpers.recipe import tiny_config
from training.checkpoint import load_checkpoint
from training.recipe import NonFiniteLossError, train


def test_non_finite_gradients_stop_the_run_when_clipping_is_off(tmp_path, monkeypatch):
    """With grad_clip off no gradient norm was computed: an inf gradient behind a finite loss was stepped, the
    NaN weights were checkpointed as the "last good" one, and the run only stopped on the next step's loss."""
    real = recipe.micro_batch_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, items = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # call 1 is the memory pre-flight: optimizer step 2, finite loss, inf gradients
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss, items

    monkeypatch.setattr(recipe, "micro_batch_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="gradient norm") as info:
        train(tiny_config(tmp_path / "run", max_steps=3, save_every=1, grad_clip=None))
    assert info.value.step == 2
    _, _, state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 1


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_the_gradient_norm_is_measured_and_only_a_set_clip_scales_the_gradients(tmp_path, grad_clip):
    import torch

    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    model.bias.grad = torch.tensor([float("inf"), 0.0]) if grad_clip is None else torch.zeros(2)
    norm = recipe.clip_gradients(model, tiny_config(tmp_path, grad_clip=grad_clip))
    if grad_clip is None:  # reported, and the gradients left as they are (not scaled by inf / inf = NaN)
        assert norm == float("inf")
        assert torch.equal(model.weight.grad, torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    else:
        assert norm == pytest.approx(5.0)
        assert float(model.weight.grad.norm()) == pytest.approx(0.5, rel=1e-4)
