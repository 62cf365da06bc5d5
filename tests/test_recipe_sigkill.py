"""A run killed with SIGKILL mid-training leaves a loadable last checkpoint and resumes from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.recipe import tiny_config
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.recipe import train

ROOT = Path(__file__).resolve().parents[1]


def _last_step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoints" / "last" / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.slow
def test_sigkilled_run_leaves_a_loadable_checkpoint_and_resumes(tmp_path):
    run = tmp_path / "run"
    config = tiny_config(run, max_steps=200, epochs=50, save_every=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "training.train", "--config", str(tmp_path / "c.yaml")], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while _last_step(run) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert _last_step(run) >= 3, "the run wrote no checkpoint in time"
        time.sleep(0.13)  # land somewhere inside a later step or checkpoint write
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    _, train_state, info = load_checkpoint(run)
    step = info["step"]
    assert step >= 3 and "optimizer" in train_state
    resumed = train(TrainConfig.from_file(run / "config.yaml").replace(resume=str(run), max_steps=step + 2))
    assert resumed.status == "completed" and resumed.steps == step + 2 and len(resumed.losses) == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", f"step-{step + 2:08d}"]
