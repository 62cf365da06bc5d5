"""Review findings in resume and the run folder: settings given with ``resume`` were silently ignored, a resume
with another global batch went ahead, a fresh run left the previous run's checkpoint for a later ``--resume``,
and re-saving a checkpoint needed hard links."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import training.checkpoint as ckpt_mod
from models.errors import CheckpointError, ConfigError
from tests.helpers.recipe import tiny_config
from training.checkpoint import find_checkpoint, load_checkpoint, read_checkpoint_info, rng_state, save_checkpoint
from training.config import TrainConfig
from training.recipe import resolve_resume_config, train
from training.schedule import warmup_cosine_factor


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run of 3 planned steps stopped after 2 (checkpoint at step 2); tests resume copies of it."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    calls = iter(range(100))
    result = train(tiny_config(run, max_steps=3), should_stop=lambda: next(calls) == 1)
    assert result.status == "stopped" and result.steps == 2
    return run


@pytest.fixture
def run_copy(stopped_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(stopped_run, copy, symlinks=True)
    return copy


def test_a_new_max_steps_given_with_resume_applies_and_the_schedule_follows_it(run_copy):
    """``resume`` without data took every setting from config.yaml: max_steps=4 ran to the saved 3, silently."""
    result = train(tiny_config("", data="", resume=str(run_copy), max_steps=4))
    assert (result.steps, result.total_steps, len(result.losses)) == (4, 4, 2)
    records = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    # step 3 is step index 2 of the new 4-step schedule (warmup round(0.2 x 4) = 1), not of the saved 3-step one
    assert lr[3] == pytest.approx(2e-3 * warmup_cosine_factor(2, 4, 1), rel=1e-12)
    assert "max_steps: 4" in (run_copy / "config.yaml").read_text()


def test_settings_that_change_an_optimizer_step_are_refused_with_their_names(run_copy):
    with pytest.raises(ConfigError, match=r"lr 0\.002 -> 0\.005.*seed 0 -> 3"):
        train(tiny_config("", data="", resume=str(run_copy), lr=5e-3, seed=3))
    saved = TrainConfig.from_file(run_copy / "config.yaml")
    with pytest.raises(ConfigError, match="optimizer 'adamw' -> 'coap'"):
        train(saved.replace(resume=str(run_copy), optimizer="coap"))
    assert read_checkpoint_info(run_copy)["step"] == 2  # refused before anything was written


def test_a_max_steps_below_the_checkpoint_is_refused(run_copy):
    with pytest.raises(ConfigError, match="at step 2, past this run's 1 steps"):
        train(tiny_config("", data="", resume=str(run_copy), max_steps=1))


def test_a_resume_with_data_and_no_out_continues_in_the_runs_own_folder(run_copy):
    """With ``data`` given, ``out`` kept its default: the resume of ``runs/x`` wrote into ``runs/train``."""
    saved = TrainConfig.from_file(run_copy / "config.yaml")
    for out in ("", TrainConfig.out):
        resolved = resolve_resume_config(saved.replace(resume=str(run_copy), out=out))
        assert resolved.out == str(run_copy.resolve())


def test_the_module_cli_refuses_a_resume_setting_even_at_its_default(run_copy, capsys):
    """lr=0.001 is TrainConfig's default: only the run's saved config shows that it differs (0.002)."""
    from training.train import main

    assert main(["--resume", str(run_copy), "--set", "lr=0.001", "--quiet"]) == 2
    assert "lr 0.002 -> 0.001" in capsys.readouterr().err


def test_glasses_vision_train_resume_refuses_a_new_lr(run_copy, capsys):
    from service.cli import main

    assert main(["train", "--resume", str(run_copy), "--lr", "0.005", "--quiet"]) == 2
    assert "lr 0.002 -> 0.005" in capsys.readouterr().err


def test_glasses_vision_train_resume_refuses_a_setting_even_at_its_default(run_copy, capsys):
    """--lr 0.001 is TrainConfig's default: without the run's saved config as the start it looked not given."""
    from service.cli import main

    assert main(["train", "--resume", str(run_copy), "--lr", "0.001", "--quiet"]) == 2
    assert "lr 0.002 -> 0.001" in capsys.readouterr().err


@pytest.mark.parametrize("batch, accumulate, world, refused", [
    (4, 1, 2, "global batch of 4 images .* would take 8 images .* batch 4 and accumulate 1 on 1 process"),
    (2, 1, 1, "would take 2 images .* e.g. accumulate 2 with batch 2 on 1 process"),
    (2, 2, 1, None),
    (2, 1, 2, None),
])
def test_a_resume_must_keep_the_global_batch(run_copy, batch, accumulate, world, refused):
    """The checkpoint's world size was stored but never compared: another global batch resumed silently."""
    config = tiny_config("", data="", resume=str(run_copy), batch=batch, accumulate=accumulate)
    if refused:
        with pytest.raises(ConfigError, match=refused):
            resolve_resume_config(config, world=world)
    else:
        with pytest.warns(UserWarning, match="the same images per optimizer step, but not bit for bit"):
            resolved = resolve_resume_config(config, world=world)
        assert (resolved.batch, resolved.accumulate) == (batch, accumulate)


def test_a_fresh_run_in_an_old_runs_folder_removes_its_checkpoints(run_copy):
    """A fresh run that died before its first checkpoint left the old run's ``last`` for a later ``--resume``."""
    with pytest.raises(ConfigError):  # refused before it starts: the old run stays as it was
        train(tiny_config(run_copy, max_steps=5, lr=-1.0))
    assert read_checkpoint_info(run_copy)["step"] == 2

    def die_at_start(event):
        if event["event"] == "start":
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(run_copy, max_steps=5, seed=1), on_event=die_at_start)
    with pytest.raises(CheckpointError):
        find_checkpoint(run_copy)
    assert sorted(p.name for p in run_copy.iterdir()) == ["config.yaml"]


def test_resaving_a_step_without_hard_links_copies(tmp_path, monkeypatch):
    """``_linked_copy`` hard-linked the staging files; where ``os.link`` fails the re-save raised shutil.Error."""
    def no_links(src, dst, **kwargs):
        raise PermissionError(1, "Operation not permitted", src)

    root = tmp_path / "checkpoints"
    for value in (0.0, 1.0):
        save_checkpoint(root, 9, {"w": torch.full((2,), value)}, {"rng": rng_state()}, {"epoch": 0})
        monkeypatch.setattr(ckpt_mod.os, "link", no_links)
    model_state, _, info = load_checkpoint(root)
    assert info["step"] == 9 and torch.equal(model_state["w"], torch.ones(2))
    assert sorted(p.name for p in root.iterdir()) == ["last", "step-00000009"]


@pytest.mark.parametrize("cli", ["glasses-vision", "module"])
def test_the_command_lines_refuse_to_replace_an_earlier_run_without_overwrite(run_copy, capsys, cli):
    """A re-run into a folder that holds a trained run removed its checkpoints and model without a word."""
    config = run_copy / "config.yaml"
    before = sorted(p.name for p in run_copy.iterdir())
    if cli == "glasses-vision":
        from service.cli import main
        argv = ["train", "--config", str(config), "--out", str(run_copy), "--quiet"]
    else:
        from training.train import main
        argv = ["--config", str(config), "--set", f"out={run_copy}", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and f"--resume {run_copy}" in err and "--overwrite" in err
    assert sorted(p.name for p in run_copy.iterdir()) == before  # nothing removed


def test_overwrite_replaces_the_earlier_run(run_copy):
    from training.recipe import check_out_folder

    config = TrainConfig.from_file(run_copy / "config.yaml").replace(out=str(run_copy))
    with pytest.raises(ConfigError, match="holds an earlier run"):
        check_out_folder(config, overwrite=False)
    check_out_folder(config, overwrite=True)
    check_out_folder(config.replace(resume=str(run_copy)), overwrite=False)  # continuing it is fine
    check_out_folder(config.replace(out=str(run_copy / "new")), overwrite=False)  # an empty folder is fine
