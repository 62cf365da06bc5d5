"""training.checkpoint: atomic save, find/load round trip, ``last`` after a crash, refusing corrupt or missing checkpoints."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import training.checkpoint as ckpt_mod
from models.errors import CheckpointError
from training.checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state


def _model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "bn.running_mean": torch.randn(4, generator=g),
            "bn.num_batches_tracked": torch.tensor(7)}


def _train_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"optimizer": {"state": {0: {"exp_avg": torch.randn(5, generator=g), "step": torch.tensor(3.0)}},
                          "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "scheduler": {"last_epoch": 3, "base_lrs": [1e-3]}, "rng": rng_state()}


def _save(root, step, seed=0, **kw):
    return save_checkpoint(root, step, _model_state(seed), _train_state(seed), {"epoch": 1, "best": 0.5}, **kw)


def test_round_trip_from_run_dir_checkpoints_dir_and_step_dir(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    target = _save(root, 12, seed=1)
    assert target == root / "step-00000012"
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "state.json", "train_state.pt"]
    assert (root / "last").is_symlink() and (root / "last").resolve() == target.resolve()
    for where in (tmp_path / "run", root, target):
        assert find_checkpoint(where) == target.resolve()

    model_state, train_state, info = load_checkpoint(tmp_path / "run")
    expected = _model_state(1)
    assert model_state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(model_state[k], v) and model_state[k].dtype == v.dtype
    assert torch.equal(train_state["optimizer"]["state"][0]["exp_avg"], _train_state(1)["optimizer"]["state"][0]["exp_avg"])
    assert train_state["scheduler"] == {"last_epoch": 3, "base_lrs": [1e-3]}
    assert info == {"epoch": 1, "best": 0.5, "step": 12}
    assert json.loads((target / "state.json").read_text())["step"] == 12


def test_last_moves_to_newest_and_keep_prunes_older(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    _save(root, 2, keep=2)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000001", "step-00000002"]
    newest = _save(root, 3, seed=3, keep=2)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000003"]
    assert find_checkpoint(root) == newest.resolve()
    assert load_checkpoint(root)[2]["step"] == 3
    _save(root, 4)  # keep=1
    assert [p.name for p in root.glob("step-*")] == ["step-00000004"]
    assert not list(root.glob(".*tmp*"))  # no staging directories or temporary links left


def test_crash_while_writing_leaves_last_on_the_previous_complete_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    first = _save(root, 5, seed=5)
    real = ckpt_mod.atomic_write_bytes

    def dying(path, data):
        if path.name == "train_state.pt":
            raise KeyboardInterrupt("killed mid-save")
        return real(path, data)

    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", dying)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 6, seed=6)
    monkeypatch.undo()

    assert find_checkpoint(root) == first.resolve()
    model_state, _, info = load_checkpoint(root)
    assert info["step"] == 5 and torch.equal(model_state["conv.weight"], _model_state(5)["conv.weight"])
    assert not (root / "step-00000006").exists()
    # the next successful save clears the crashed attempt's staging directory
    _save(root, 7)
    assert not list(root.glob(".tmp-step-*"))
    assert load_checkpoint(root)[2]["step"] == 7


def test_resave_of_the_step_last_points_at_writes_the_new_content(tmp_path):
    """A second save at the step ``last`` is on used to return early and keep the first content silently."""
    root = tmp_path / "checkpoints"
    first = _save(root, 9, seed=1)
    again = _save(root, 9, seed=2)
    assert again == first and find_checkpoint(root) == first.resolve()
    model_state, train_state, info = load_checkpoint(root)
    assert info["step"] == 9 and torch.equal(model_state["conv.weight"], _model_state(2)["conv.weight"])
    assert torch.equal(train_state["optimizer"]["state"][0]["exp_avg"], _train_state(2)["optimizer"]["state"][0]["exp_avg"])
    assert [p.name for p in root.iterdir() if p.name != "last"] == ["step-00000009"]


@pytest.mark.parametrize("dies_at", ["rmtree", "replace"])
def test_crash_during_a_resave_leaves_last_on_a_complete_checkpoint(tmp_path, monkeypatch, dies_at):
    root = tmp_path / "checkpoints"
    _save(root, 9, seed=1)
    target = root / "step-00000009"
    real_rmtree, real_replace = ckpt_mod.shutil.rmtree, ckpt_mod.os.replace

    def rmtree(path, *args, **kw):
        if dies_at == "rmtree" and Path(path) == target:
            (target / "train_state.pt").unlink()  # killed half-way through removing the old copy
            raise KeyboardInterrupt("killed")
        return real_rmtree(path, *args, **kw)

    def replace(src, dst):
        if dies_at == "replace" and Path(dst) == target:
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", rmtree)
    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 9, seed=2)
    monkeypatch.undo()
    model_state, _, info = load_checkpoint(root)  # ``last`` is on the complete new copy (still in staging)
    assert info["step"] == 9 and torch.equal(model_state["conv.weight"], _model_state(2)["conv.weight"])
    _save(root, 10, seed=3)  # the next save cleans up
    assert sorted(p.name for p in root.iterdir()) == ["last", "step-00000010"]
    assert load_checkpoint(root)[2]["step"] == 10


def test_a_leftover_directory_of_the_same_step_is_replaced(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    stale = root / "step-00000002"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    _save(root, 2, seed=2, keep=3)
    model_state, _, info = load_checkpoint(root)
    assert info["step"] == 2 and torch.equal(model_state["conv.weight"], _model_state(2)["conv.weight"])


def test_leftovers_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    """A save killed mid-way leaves its staging directory or its temporary ``last`` link (named after its pid);
    the next save, in another process, removes both, so the run folder holds only checkpoints and ``last``."""
    root = tmp_path / "checkpoints"
    _save(root, 1)
    (root / ".tmp-step-00000002-99999-deadbeef").mkdir()
    (root / ".last.99999.tmp").symlink_to("step-00000001")
    _save(root, 2)
    assert sorted(p.name for p in root.iterdir()) == ["last", "step-00000002"]


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        find_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        load_checkpoint(tmp_path / "does-not-exist")
    target = _save(tmp_path / "checkpoints", 1)
    (target / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.pt", "state.json"])
def test_corrupt_file_is_refused_with_checkpoint_error(tmp_path, name):
    target = _save(tmp_path / "checkpoints", 1)
    data = (target / name).read_bytes()
    (target / name).write_bytes(data[: len(data) // 2])  # truncated, as by a disk filling up
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path)


def test_missing_state_json_is_refused(tmp_path):
    target = _save(tmp_path / "checkpoints", 1)
    (target / "state.json").unlink()
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path)


class _Payload:
    """An arbitrary Python object: unpickling it would run code chosen by whoever wrote the file."""


def test_train_state_is_loaded_weights_only(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, _model_state(), {"optimizer": _Payload()}, {})
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(root)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, _model_state(), {"rng": rng_state()}, {})
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)

    set_rng_state(load_checkpoint(root)[1]["rng"])
    got = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
