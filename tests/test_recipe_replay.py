"""Replay (source frames mixed into every step), augmentation settings, and full fine-tuning by name."""

from __future__ import annotations

import pytest

from models import DetectionModel
from models.errors import ConfigError
from tests.helpers.recipe import tiny_config, tiny_dataset
from training.config import TrainConfig
from training.recipe import train


def test_replay_settings_are_checked_before_training(tmp_path):
    with pytest.raises(ConfigError, match="replay_fraction"):
        tiny_config(tmp_path, replay_fraction=1.0, replay=str(tiny_dataset())).validate()
    with pytest.raises(ConfigError, match="needs a replay dataset"):
        tiny_config(tmp_path, replay_fraction=0.25).validate()
    with pytest.raises(ConfigError, match="less than one image"):
        tiny_config(tmp_path, replay=str(tiny_dataset()), replay_fraction=0.05, batch=4).validate()
    with pytest.raises(ConfigError, match="does not exist"):
        train(tiny_config(tmp_path / "r", replay=str(tmp_path / "missing.yaml"), replay_fraction=0.25, max_steps=1))


def test_a_run_with_replay_reads_source_frames(tmp_path, monkeypatch):
    source = tiny_dataset(n=20, imgsz=64, domain="source", seed=5)
    target = tiny_dataset(n=20, imgsz=64, domain="egocentric", seed=6)
    seen = []
    from training.data import dataset as dataset_module

    original = dataset_module.DetectionDataset.__getitem__

    def spy(self, i):
        item = original(self, i)
        seen.append(item["im_file"])
        return item

    monkeypatch.setattr(dataset_module.DetectionDataset, "__getitem__", spy)
    result = train(tiny_config(tmp_path / "run", data=str(target), replay=str(source), replay_fraction=0.5,
                               max_steps=2))
    assert result.status == "completed" and result.steps == 2
    train_reads = seen[-(2 * 4 + 4):-4]  # the two steps' 8 images, before the 4 val images of the final eval
    from_source = [f for f in train_reads if str(source.parent) in f]
    assert len(from_source) == 4


def test_augment_settings_reach_the_dataset_and_bad_ones_are_refused(tmp_path):
    cfg = tiny_config(tmp_path, augment_settings={"mosaic": 0.5, "scale": [0.5, 1.5]})
    aug = cfg.validate().augment_config()
    assert aug.mosaic == 0.5 and aug.scale == (0.5, 1.5)
    assert tiny_config(tmp_path, augment=False, augment_settings={"mosaic": 1.0}).augment_config() is None
    with pytest.raises(ConfigError, match="unknown augment_settings"):
        tiny_config(tmp_path, augment_settings={"mosiac": 0.5}).validate()


@pytest.mark.parametrize("flags, trained_parts", [
    (["--peft", "full"], {"backbone", "neck", "head"}),
    (["--peft", "none", "--set", "peft_settings={targets: [head]}"], {"head"}),
])
def test_full_fine_tuning_from_the_cli_goes_through_apply_peft(tmp_path, flags, trained_parts, monkeypatch, capsys):
    """``--peft full`` used to fail after training: the run saved an adapter that did not exist. Full fine-tuning is
    now the registry's ``full`` method: the chosen parts train, the DFL projection stays fixed, no adapter is written."""
    import json

    from service.cli import main
    from service.layers import peft

    applied = []
    monkeypatch.setattr("training.recipe.apply_peft", lambda model, method, **kw: applied.append((method, kw))
                        or peft.apply_peft(model, method, **kw))
    out = tmp_path / "run"
    code = main(["train", "--data", str(tiny_dataset()), "--base", "yolo11n", *flags, "--imgsz", "64", "--batch", "4",
                 "--max-steps", "2", "--eval-every", "0", "--out", str(out), "--quiet"])
    assert code == 0 and "done in" in capsys.readouterr().out
    assert [method for method, _ in applied] == ["full"]
    assert (out / "merged" / "model.safetensors").is_file() and not (out / "adapter").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2 and "adapter" not in summary["outputs"]
    per_part = summary["trainable"]["per_part"]
    assert {part for part, n in per_part.items() if n["trainable"]} == trained_parts
    base = DetectionModel("yolo11n", nc=6, imgsz=64)
    frozen = {n: p.numel() for n, p in base.named_parameters()
              if ".dfl." in n or base.part_of(n) not in trained_parts}
    assert summary["trainable"]["total"] - summary["trainable"]["trainable"] == sum(frozen.values())
    assert TrainConfig.from_file(out / "config.yaml").full_fine_tuning
