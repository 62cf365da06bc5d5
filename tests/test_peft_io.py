"""Adapter files: bit-identical reload into a fresh model, BatchNorm statistics, clear errors on mismatch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.errors import CheckpointError, ConfigError
from service.layers.peft import (
    UnknownAdapterError,
    apply_adapters,
    apply_bitfit,
    apply_dora,
    apply_lora,
    apply_qlora,
    has_peft_layers,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from tests.helpers.models import make_model
from tests.helpers.peft import predict, quiet, train_steps


@pytest.mark.parametrize(
    "apply",
    [
        lambda m: (apply_lora(m.backbone, rank=8), apply_bitfit(m, train_class_branch=True)),
        lambda m: apply_dora(m, rank=4, targets=["neck"], bn_stats="freeze"),
        lambda m: apply_adapters(m, after=["neck"], adapter_name="kitchen"),
        lambda m: apply_qlora(m, rank=4, targets=["neck"]),
        lambda m: apply_bitfit(m),
    ],
    ids=["lora+bitfit+class", "dora-frozen-bn", "adapters", "qlora", "bitfit-only"],
)
def test_adapter_reloads_bit_identically(apply, tmp_path):
    model = make_model()
    quiet(apply, model)
    train_steps(model, steps=1)
    save_adapter(model, tmp_path / "a")
    cfg = read_adapter_config(tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert cfg["bn_stats_saved"] == (cfg["bn_stats"] == "update")
    assert any(k.endswith("running_mean") for k in tensors) == cfg["bn_stats_saved"]
    assert all(k.startswith("base_model.model.model.") for k in tensors)  # HF PEFT's key names
    assert not any(".default." in k or ".kitchen." in k for k in tensors)  # without adapter names
    fresh = make_model()
    quiet(load_adapter, fresh, tmp_path / "a")
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(predict(fresh, x), predict(model, x))
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad)


def test_bn_statistics_are_what_makes_reload_exact(tmp_path):
    model = make_model()
    quiet(apply_lora, model, rank=4, targets=["neck"])
    train_steps(model, steps=2)
    save_adapter(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "running" not in k and "num_batches" not in k},
              str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_adapter(make_model(), tmp_path / "a")


def test_other_architecture_is_refused(tmp_path):
    model = make_model("yolo11n")
    quiet(apply_lora, model, rank=4, targets=["neck"])
    save_adapter(model, tmp_path / "a")
    with pytest.raises(CheckpointError, match="another architecture"):
        load_adapter(make_model("yolov8n"), tmp_path / "a")


def test_other_rank_is_refused(tmp_path):
    model = make_model()
    apply_lora(model, rank=4, targets=["model.5.conv"], adapter_name="kitchen")
    save_adapter(model, tmp_path / "a")
    other = make_model()
    apply_lora(other, rank=2, targets=["model.5.conv"], adapter_name="kitchen")
    with pytest.raises(CheckpointError, match="rank 4 in the file, rank 2 in the model"):
        load_adapter(other, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["glasses_vision"]["config"]["rank_pattern"]["model.5.conv"] = 8  # a config that does not match its tensors
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = make_model()
    with pytest.raises(CheckpointError, match="other shapes"):
        load_adapter(fresh, tmp_path / "a")
    assert not has_peft_layers(fresh)  # rolled back


def test_missing_and_unknown_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not an adapter directory"):
        load_adapter(make_model(), tmp_path / "nothing")
    model = make_model()
    with pytest.raises(ConfigError, match="nothing to save"):
        save_adapter(model, tmp_path / "b")
    apply_lora(model, rank=2, targets=["model.5.conv"])
    with pytest.raises(UnknownAdapterError, match="this model holds: default"):
        save_adapter(model, tmp_path / "b", adapter_name="shelf")
