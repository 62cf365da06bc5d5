"""training.recipe's BatchPlan and GlobalBatchSampler: which images each optimizer step takes, on every process."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.recipe import tiny_config
from training.recipe import BatchPlan, DistInfo, GlobalBatchSampler, build_loader


def _batches(epoch: int = 1, rank: int = 0, start_step: int = 0, steps: int | None = None, **plan) -> list[list[int]]:
    values = dict(n=12, batch=4, accumulate=2, world=1, seed=3)
    values.update(plan)
    return list(GlobalBatchSampler(BatchPlan(**values), epoch, rank=rank, start_step=start_step, steps=steps))


def _steps(batches: list[list[int]], per_step: int) -> list[list[int]]:
    return [sum(batches[i : i + per_step], []) for i in range(0, len(batches), per_step)]


def test_plan_sizes():
    plan = BatchPlan(n=50, batch=4, accumulate=2, world=3, replay_n=9, replay_per_step=6)
    assert (plan.global_batch, plan.targets_per_step, plan.steps_per_epoch) == (24, 18, 2)
    assert BatchPlan(n=7, batch=4, accumulate=2).steps_per_epoch == 0  # the recipe refuses such a run
    with pytest.raises(ValueError, match="replay_n"):
        BatchPlan(n=10, batch=4, replay_per_step=1)


def test_plan_for_run_reads_the_config(tmp_path):
    cfg = tiny_config(tmp_path, batch=4, accumulate=3, seed=7, replay="source.yaml", replay_fraction=0.25)
    plan = BatchPlan.for_run(cfg, n=100, world=2, replay_n=30)
    assert plan == BatchPlan(n=100, batch=4, accumulate=3, world=2, seed=7, replay_n=30, replay_per_step=6)
    assert BatchPlan.for_run(cfg, n=100, world=2).replay_per_step == 0  # no replay images: no replay


def test_without_replay_a_step_is_the_next_slice_of_the_epoch_permutation():
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert _batches() == [order[0:4], order[4:8]]
    assert _batches(shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_an_epoch_sees_every_image_at_most_once_and_epochs_differ():
    plan = dict(n=50, batch=3, accumulate=2, seed=11)
    epoch1, epoch2 = _batches(epoch=1, **plan), _batches(epoch=2, **plan)
    seen = [i for b in epoch1 for i in b]
    assert len(epoch1) == 8 * 2 and len(seen) == len(set(seen)) == 48 and all(0 <= i < 50 for i in seen)
    assert epoch1 != epoch2 and _batches(epoch=1, **plan) == epoch1  # seeded by seed + epoch, nothing else


def test_length_counts_the_micro_batches_left():
    sampler = GlobalBatchSampler(BatchPlan(n=40, batch=2, accumulate=3), epoch=0, start_step=2)
    assert len(sampler) == len(list(sampler)) == (6 - 2) * 3
    assert len(GlobalBatchSampler(BatchPlan(n=40, batch=2, accumulate=3), epoch=0, steps=4)) == 12


@pytest.mark.parametrize("replay", [{}, {"replay_n": 7, "replay_per_step": 2}])
def test_a_step_holds_the_same_images_however_it_is_split(replay):
    """batch 8 on one process = batch 4 x accumulate 2 = batch 2 x accumulate 2 on two processes."""
    one = _steps(_batches(n=40, batch=8, accumulate=1, **replay), 1)
    accumulated = _steps(_batches(n=40, batch=4, accumulate=2, **replay), 2)
    ranks = [_steps(_batches(n=40, batch=2, accumulate=2, world=2, rank=r, **replay), 2) for r in range(2)]
    assert len(one) == len(accumulated) == len(ranks[0]) == 40 // (8 - replay.get("replay_per_step", 0))
    for s in range(len(one)):
        assert sorted(one[s]) == sorted(accumulated[s]) == sorted(ranks[0][s] + ranks[1][s])


def test_replay_mixes_the_asked_share_into_each_step():
    steps = _steps(_batches(n=30, steps=3, replay_n=5, replay_per_step=2), 2)
    for step in steps:
        replayed = [i for i in step if i >= 30]
        assert len(replayed) == 2 and all(30 <= i < 35 for i in replayed) and len(set(step)) == 8
    target = [i for step in steps for i in step if i < 30]
    assert len(target) == len(set(target)) == 18  # every target image at most once per epoch


@pytest.mark.parametrize("replay", [{}, {"replay_n": 5, "replay_per_step": 2}])
def test_resuming_at_any_step_gives_the_rest_of_the_epoch(replay):
    full = _batches(n=30, **replay)
    for start in range(len(full) // 2):
        assert _batches(n=30, start_step=start, **replay) == full[2 * start :]


def test_building_a_loader_draws_nothing_from_the_global_rng(tmp_path):
    from training.data import build_dataset

    cfg = tiny_config(tmp_path)
    ds = build_dataset(cfg.data, split="train", imgsz=cfg.imgsz, augment=False)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    loader = build_loader(ds, cfg, DistInfo(), epoch=0, start_step=0, steps=1)
    assert torch.equal(torch.rand(3), expected)
    assert [b["img"].shape[0] for b in loader] == [cfg.batch]


def test_a_plan_without_one_full_step_is_refused():
    from models.errors import ConfigError

    assert BatchPlan(n=8, batch=4, accumulate=2).check().steps_per_epoch == 1
    with pytest.raises(ConfigError, match="has 5 images but one optimizer step needs 6 .*minus 2 replayed"):
        BatchPlan(n=5, batch=4, accumulate=2, replay_n=3, replay_per_step=2).check()
