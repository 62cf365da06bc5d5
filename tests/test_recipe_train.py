"""The recipe end to end: outputs of a run, exact resume, NaN handling, bad input refused before training."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from models.detection import DetectionModel
from models.errors import ConfigError, DataError
from tests.helpers.recipe import tiny_config, tiny_dataset
from training.checkpoint import load_checkpoint
from training.recipe import NonFiniteLossError, train


def test_run_writes_every_output(tmp_path):
    events = []
    result = train(tiny_config(tmp_path / "run", max_steps=3, ema=True, save_every=2), on_event=events.append)
    run = tmp_path / "run"
    assert result.status == "completed" and result.steps == 3 and len(result.losses) == 3
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "memory.txt", "training_curves.png", "pr_curve.png"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r["kind"] for r in records][-1] == "eval" and "map50_95" in records[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["memory"]["optimizer_state"] > 0
    assert "activations saved for backward" in (run / "memory.txt").read_text()
    assert DetectionModel.load(run / "merged").nc == 6 and DetectionModel.load(run / "best").imgsz == 64
    _, _, info = load_checkpoint(run)
    assert info["step"] == 3
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and "eval" in kinds and kinds.count("step") == 3


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(tmp_path):
    # augmentation on, EMA on, and the stop falls mid-epoch (4 steps per epoch, 6 in all)
    settings = dict(max_steps=6, epochs=2, augment=True, ema=True)
    full = train(tiny_config(tmp_path / "full", **settings))
    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] == 3

    first = train(tiny_config(tmp_path / "split", **settings), should_stop=stop_after_three)
    assert first.status == "stopped" and first.steps == 3
    # the resume names the run's own settings: tiny_config's epochs=1 would now apply (a resume may change epochs)
    second = train(tiny_config("", data="", resume=str(tmp_path / "split"), **settings))
    assert second.status == "completed" and second.steps == 6
    assert first.losses + second.losses == full.losses  # bitwise, on CPU with a fixed seed
    a, b = DetectionModel.load(tmp_path / "full" / "merged"), DetectionModel.load(tmp_path / "split" / "merged")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import training.recipe as recipe

    real = recipe.micro_batch_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, items = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 4 else loss), items  # call 1 is the memory pre-flight

    monkeypatch.setattr(recipe, "micro_batch_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 3") as info:
        train(tiny_config(tmp_path / "run", max_steps=4, save_every=2))
    assert info.value.step == 3 and "checkpoints/last (step 2)" in str(info.value)
    _, _, state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["step"] == 3


def _refused(config, error, words, tmp_path):
    with pytest.raises(error, match=words):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_input_is_refused_before_training(tmp_path):
    run = tmp_path / "run"
    _refused(tiny_config(run, data=str(tmp_path / "missing.yaml")), ConfigError, "does not exist", tmp_path)
    nowhere = tmp_path / "nowhere.yaml"
    nowhere.write_text(yaml.safe_dump({"path": str(tmp_path / "gone"), "train": "images/train", "val": "images/val",
                                       "names": {0: "cup"}}))
    _refused(tiny_config(run, data=str(nowhere)), (ConfigError, DataError), "gone|exist|found", tmp_path)
    other = DetectionModel("yolo11n", names=["a", "b", "c", "d", "e", "f"], imgsz=64)
    other.save(tmp_path / "other_base")
    _refused(tiny_config(run, base=str(tmp_path / "other_base")), ConfigError, "new_classes", tmp_path)
    _refused(tiny_config(run, optimizer="adamw", in_backward=True, accumulate=2, grad_clip=None), ConfigError,
             "accumulate", tmp_path)
    _refused(tiny_config(run, memory_limit_mb=1), ConfigError, "lower batch", tmp_path)
    _refused(tiny_config(run, batch=64), ConfigError, "lower batch or accumulate", tmp_path)


def test_new_classes_replace_the_class_predictor(tmp_path):
    other = DetectionModel("yolo11n", names=["a", "b"], imgsz=64)
    other.save(tmp_path / "other_base")
    result = train(tiny_config(tmp_path / "run", base=str(tmp_path / "other_base"), new_classes=True, max_steps=1))
    assert result.status == "completed" and result.steps == 1
    names = yaml.safe_load(tiny_dataset().read_text())["names"]
    names = dict(enumerate(names)) if isinstance(names, list) else {int(k): v for k, v in names.items()}
    merged = DetectionModel.load(result.merged_dir)  # what the run saved, after training
    assert merged.names == names and merged.nc == len(names) == 6
    assert all(branch[-1].out_channels == 6 for branch in merged.model[-1].cv3)
    with torch.no_grad():
        out = merged.eval()(torch.rand(1, 3, 64, 64))
    assert (out[0] if isinstance(out, (tuple, list)) else out).shape[1] == 4 + 6
    # only the class predictor is new: every other weight is the base's, moved by one small optimizer step
    base, trained = other.state_dict(), merged.state_dict()
    replaced = {k for k in base if base[k].shape != trained[k].shape}
    assert replaced and all(k.startswith("model.23.cv3.") and k.split(".")[4] == "2" for k in replaced), replaced
    kept = [k for k in base if k not in replaced and base[k].is_floating_point() and "running_" not in k]
    assert max(float((trained[k] - base[k]).abs().max()) for k in kept) < 1e-2


def test_cli_train_and_eval(tmp_path, capsys):
    from service.cli import main

    data = str(tiny_dataset())
    code = main(["train", "--data", data, "--base", "yolo11n", "--imgsz", "64", "--batch", "4", "--max-steps", "1",
                 "--eval-every", "0", "--out", str(tmp_path / "run"), "--quiet", "--amp", "bf16"])
    assert code == 0 and "mAP50-95" in capsys.readouterr().out
    assert main(["eval", "--data", data, "--model", str(tmp_path / "run"), "--quiet", "--json", str(tmp_path / "m.json")]) == 0
    assert "all" in capsys.readouterr().out and json.loads((tmp_path / "m.json").read_text())["images"] == 4
