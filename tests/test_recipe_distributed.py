"""torchrun-style data parallel: 2 gloo processes equal 1 process with the same global batch."""

from __future__ import annotations


import pytest
import torch

from models.detection import DetectionModel
from tests.helpers.recipe import ddp_worker, run_on_gloo_processes, tiny_config
from training.recipe import train


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    settings = dict(max_steps=3, augment=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same float summation order
    # one process: 2 micro-batches of 2 accumulated = global batch 4
    try:
        single = train(tiny_config(tmp_path / "single", batch=2, accumulate=2, **settings))
    finally:
        torch.set_num_threads(threads)
    # two processes: 2 images each = global batch 4, DistributedDataParallel averages the gradients
    config = tiny_config(tmp_path / "ddp", batch=2, accumulate=1, **settings).to_dict()
    ddp_losses = run_on_gloo_processes(ddp_worker, config, tmp_path)
    assert len(ddp_losses) == 3
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single.losses), rtol=1e-4, atol=1e-5)
    a, b = DetectionModel.load(tmp_path / "single" / "merged"), DetectionModel.load(tmp_path / "ddp" / "merged")
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
