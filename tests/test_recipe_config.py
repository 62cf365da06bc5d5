"""TrainConfig: loading from YAML / JSON, documented defaults, validation errors that say what to change."""

from __future__ import annotations

import dataclasses
import json

import pytest

from models.errors import ConfigError
from training.config import TrainConfig


def test_yaml_and_json_load_the_same_config(tmp_path):
    values = {"data": "d/data.yaml", "peft": "none", "rank": 4, "optimizer": "coap", "grad_checkpoint": "backbone,neck",
              "accumulate": 4, "amp": "bf16", "epochs": 3, "imgsz": 160, "batch": 8, "out": "runs/k",
              "optimizer_settings": {"update_interval": 8}}
    (tmp_path / "c.json").write_text(json.dumps(values))
    import yaml

    (tmp_path / "c.yaml").write_text("# glasses-vision train --config c.yaml\n" + yaml.safe_dump(values))
    a, b = TrainConfig.from_file(tmp_path / "c.json"), TrainConfig.from_file(tmp_path / "c.yaml")
    assert a == b
    assert a.grad_checkpoint == ["backbone", "neck"] and a.optimizer_settings == {"update_interval": 8}
    assert a.validate() is a
    # round trip through the YAML the run directory stores
    (tmp_path / "back.yaml").write_text(a.to_yaml())
    assert TrainConfig.from_file(tmp_path / "back.yaml") == a


def test_every_field_is_documented_with_a_default():
    import inspect

    source = inspect.getsource(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
        before = source.split(f"    {f.name}:")[0].rstrip().splitlines()[-1]
        assert before.strip().startswith("#:") or before.strip().startswith("#"), f"{f.name} has no doc comment"


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"data": ""}, "--data"),
        ({"imgsz": 100}, "multiple of 32"),
        ({"batch": 0}, "batch"),
        ({"accumulate": -1}, "accumulate"),
        ({"lr": 0.0}, "lr"),
        ({"amp": "fp8"}, "bf16"),
        ({"grad_checkpoint": ["torso"]}, "backbone"),
        ({"optimizer": "sgdx"}, "coap"),
        ({"warmup_fraction": 1.5}, "warmup_fraction"),
        ({"in_backward": True, "accumulate": 4, "grad_clip": None}, "accumulate"),
        ({"in_backward": True, "accumulate": 1, "grad_clip": 10.0}, "clip"),
        ({"peft": "adapters"}, "cannot be merged"),  # a run must end with merged weights for export
        ({"peft": "lorax"}, "unknown PEFT method 'lorax'; known: none, adapters"),
        ({"peft": "lora", "peft_settings": {"bogus": 1}}, r"lora does not take \['bogus'\]"),
        ({"peft": "none", "peft_settings": {"rank": 4}}, r"none does not take \['rank'\]; it takes exclude, targets"),
        ({"peft": "lora", "peft_settings": {"bn_stats": "thaw"}}, "bn_stats must be one of update, freeze"),
        ({"peft": "adapters", "new_classes": True}, "cannot be merged"),
    ],
)
def test_validation_errors_name_the_setting(changes, words):
    cfg = dataclasses.replace(TrainConfig(data="x.yaml"), **changes)
    with pytest.raises(ConfigError, match=words):
        cfg.validate()


def test_unknown_keys_and_bad_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="known keys"):
        TrainConfig.from_dict({"data": "x", "learning_rate": 1})
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        TrainConfig.from_file(tmp_path / "bad.yaml")
    (tmp_path / "c.toml").write_text("x=1")
    with pytest.raises(ConfigError, match=".yaml"):
        TrainConfig.from_file(tmp_path / "c.toml")


def test_cli_flags_override_the_file(tmp_path):
    from service.cli import build_parser
    from service.commands.train import config_from_args

    (tmp_path / "c.yaml").write_text("data: a.yaml\nbatch: 8\nepochs: 2\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--batch", "4", "--grad-checkpoint",
                                      "--set", "ema=true"])
    cfg = config_from_args(args)
    assert (cfg.data, cfg.batch, cfg.epochs, cfg.grad_checkpoint, cfg.ema) == ("a.yaml", 4, 2, ["backbone", "neck"], True)


def test_peft_arguments_are_what_apply_peft_receives():
    cfg = TrainConfig(data="x.yaml", peft="none", new_classes=True, peft_settings={"targets": ["head"]})
    assert cfg.peft_method == "full" and cfg.full_fine_tuning
    assert cfg.peft_arguments() == {"train_class_branch": True, "targets": ["head"]}
    lora = TrainConfig(data="x.yaml", peft="lora", rank=4, alpha=8.0, peft_settings={"use_rslora": True})
    assert lora.peft_method == "lora" and not lora.full_fine_tuning
    assert lora.peft_arguments() == {"rank": 4, "alpha": 8.0, "use_rslora": True}
    assert TrainConfig(data="x.yaml", peft="bitfit", rank=4).peft_arguments() == {}


def test_parts_are_named_in_one_place():
    from models import detection, parts
    from service.layers.tuners import base
    from training import settings

    assert settings.PARTS is detection.PARTS is base.PARTS is parts.PARTS == ("backbone", "neck", "head")
