"""The recipe on a GPU (skipped without CUDA): a run stopped mid-way resumes there.

Before the fix, ``restore`` loaded the train state onto the run's device, so the saved RNG states came back as CUDA
tensors and ``set_rng_state`` failed on them (``.numpy()`` of a CUDA tensor)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.recipe import tiny_config
from training.recipe import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_a_run_stopped_on_the_gpu_resumes_there(tmp_path):
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] == 2

    first = train(tiny_config(tmp_path / "run", max_steps=4, ema=True, device="cuda"), should_stop=stop_after_two)
    assert first.status == "stopped" and first.steps == 2
    second = train(tiny_config("", data="", resume=str(tmp_path / "run")))
    assert second.status == "completed" and second.steps == 4
