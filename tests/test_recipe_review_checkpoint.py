"""Review findings in ``training.checkpoint``: ``last`` must point at a complete checkpoint at every moment."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import training.checkpoint as ckpt_mod
from training.checkpoint import load_checkpoint, rng_state, save_checkpoint


def _save(root: Path, step: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    model_state = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g)}
    train_state = {"optimizer": {"state": {}, "param_groups": []}, "rng": rng_state()}
    return save_checkpoint(root, step, model_state, train_state, {"epoch": 0, "epoch_step": step})


def test_kill_after_the_new_copy_of_a_resaved_step_moves_into_place_keeps_last_loadable(tmp_path, monkeypatch):
    """A re-save of the step ``last`` is on (a fresh run in an old run's directory reaching the same step)
    pointed ``last`` at the staging directory and then renamed that directory: killed between the rename
    and the relink, ``last`` dangled and the run could not be resumed."""
    root = tmp_path / "checkpoints"
    _save(root, 9, seed=1)
    target = root / "step-00000009"
    real_replace = ckpt_mod.os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if Path(dst) == target:
            raise KeyboardInterrupt("killed")  # right after the rename, before ``last`` is switched

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 9, seed=2)
    monkeypatch.undo()
    model_state, _, info = load_checkpoint(root)
    assert info["step"] == 9
    expected = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(model_state["conv.weight"], expected)
    _save(root, 10, seed=3)
    assert sorted(p.name for p in root.iterdir()) == ["last", "step-00000010"]
