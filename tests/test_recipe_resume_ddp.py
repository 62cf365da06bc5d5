"""Exact resume on more than one process: a checkpoint holds every rank's RNG state and each rank resumes with
its own. It held rank 0's alone, which every rank restored; rank 0 alone evaluates (its DataLoader draws a seed
from the global RNG), so after an evaluation the other ranks resumed with a stream they never had and drew other
augmentations than the uninterrupted run."""

from __future__ import annotations

import warnings

import pytest
import torch

from models.detection import DetectionModel
from tests.helpers.recipe import run_on_gloo_processes, tiny_config
from training.checkpoint import load_checkpoint, rng_state, rng_state_for_rank, save_checkpoint, set_rng_state
from training.config import TrainConfig


def _uninterrupted_stopped_and_resumed(rank: int, world: int, configs: dict, init_file: str, results) -> None:
    """One gloo rank: the full run, then the split run stopped after its first epoch, then its resume."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from training.recipe import train

        full = train(TrainConfig(**configs["full"]))
        seeds: list = [None] * world
        dist.all_gather_object(seeds, torch.initial_seed())
        calls = iter(range(100))
        first = train(TrainConfig(**configs["split"]), should_stop=lambda: next(calls) == 1)
        saved_rng = load_checkpoint(configs["split"]["out"])[1]["rng"] if rank == 0 else None
        second = train(TrainConfig(**configs["resume"]))
        if rank == 0:
            results.put({"full": full.losses, "split": first.losses + second.losses,
                         "ends": [(first.status, first.steps), (second.status, second.steps)],
                         "rng_states": len(saved_rng), "seeds": seeds,
                         "rng_states_differ": not torch.equal(saved_rng[0]["torch"], saved_rng[1]["torch"])})
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_resumed_two_process_run_equals_the_uninterrupted_one(tmp_path):
    # 2 processes x batch 4 = 8 images per step, 2 steps per epoch; the stop and its checkpoint come right after
    # rank 0's end-of-epoch evaluation, which leaves rank 0's RNG ahead of rank 1's; augmentation and EMA on
    settings = dict(max_steps=4, epochs=2, eval_every=1, augment=True, ema=True)
    configs = {"full": tiny_config(tmp_path / "full", **settings).to_dict(),
               "split": tiny_config(tmp_path / "split", **settings).to_dict(),
               "resume": tiny_config("", data="", resume=str(tmp_path / "split"), **settings).to_dict()}
    out = run_on_gloo_processes(_uninterrupted_stopped_and_resumed, configs, tmp_path)
    assert out["rng_states"] == 2 and out["rng_states_differ"]  # the case rank 0's state alone got wrong
    # each process its own augmentation stream (one seed for all drew the same augmentation on every process)
    assert out["seeds"] == [configs["full"]["seed"], configs["full"]["seed"] + 1]
    assert out["ends"] == [("stopped", 2), ("completed", 4)]
    assert out["split"] == out["full"]  # the loss of every step, bitwise (CPU, fixed seed)
    a, b = DetectionModel.load(tmp_path / "full" / "merged"), DetectionModel.load(tmp_path / "split" / "merged")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_each_rank_takes_its_own_state_and_another_process_count_takes_rank_0s():
    states = [{"torch": torch.tensor([rank])} for rank in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [rng_state_for_rank(states, rank, 2) for rank in range(2)] == states
        # a resume on another process count (check_resume_batch warns that it is not bit for bit)
        assert [rng_state_for_rank(states, rank, 4) for rank in range(4)] == [states[0]] * 4
        assert rng_state_for_rank(states, 0, 1) is states[0]


def test_a_checkpoint_with_rank_0s_state_alone_still_resumes(tmp_path):
    """Checkpoints written before per-rank states hold one state (a dict): every rank takes it, and on more than
    one process a warning says the resume is exact only for rank 0's draws."""
    torch.manual_seed(5)
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"rng": rng_state()}, {"epoch": 0})
    expected = torch.rand(3)
    saved = load_checkpoint(tmp_path)[1]["rng"]  # weights_only=True reads the old format
    assert isinstance(saved, dict)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_rng_state(rng_state_for_rank(saved, 0, 1))  # one process: exact, no warning
    assert torch.equal(torch.rand(3), expected)
    with pytest.warns(UserWarning, match="exact only for rank 0"):
        state = rng_state_for_rank(saved, 0, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rng_state_for_rank(saved, 1, 2) is saved  # warned once, by rank 0
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)
