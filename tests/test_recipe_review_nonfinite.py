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
