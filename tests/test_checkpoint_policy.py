"""Checkpointing policies: ``high_res`` picks the stride <= 8 layers and gives the same gradients."""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from models.detection import DetectionModel
from models.errors import ConfigError
from training.memory import measure_memory
from training.recipe import build_criterion, micro_batch_loss
from training.settings import CHECKPOINT_POLICIES, SettingError, check_settings


def _model() -> DetectionModel:
    torch.manual_seed(0)
    model = DetectionModel("yolo11n", nc=3, imgsz=64).train()
    for m in model.modules():  # BatchNorm in eval mode: both passes normalise identically
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "img": (torch.rand(2, 3, 64, 64, generator=g) * 255).to(torch.uint8),
        "batch_idx": torch.tensor([0.0, 0.0, 1.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0], [2.0], [0.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.6, 0.2, 0.4],
                                [0.6, 0.4, 0.4, 0.2], [0.5, 0.5, 0.5, 0.5]]),
    }


def _grads_and_activation_bytes(model: DetectionModel, batch: dict):
    crit = build_criterion(model)
    model.zero_grad(set_to_none=True)
    step = lambda: micro_batch_loss(model, crit, batch, torch.device("cpu"), nullcontext)[0].backward()  # noqa: E731
    report = measure_memory(model, None, step)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, report.activations


def test_high_res_checkpoints_the_stride_8_and_finer_layers_only():
    model = _model()
    assert model.layer_strides()[:5] == [2, 4, 4, 8, 8]
    model.set_gradient_checkpointing(("backbone", "neck", "head"), policy="high_res")
    # backbone Conv/C3k2 down to stride 8, and the neck's stride-8 upsample, concat and C3k2 (P3 output)
    assert model.checkpoint_layers == {0, 1, 2, 3, 4, 14, 15, 16}
    model.set_gradient_checkpointing(("neck",), policy="high_res")
    assert model.checkpoint_layers == {14, 15, 16}
    model.set_gradient_checkpointing(("backbone", "neck"), policy="all")
    assert model.checkpoint_layers == set(range(23))
    assert model.training and all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_every_policy_of_the_settings_is_one_the_model_takes():
    model = _model()
    for policy in CHECKPOINT_POLICIES:
        model.set_gradient_checkpointing(("backbone",), policy=policy)
    with pytest.raises(ConfigError, match="high_res"):
        model.set_gradient_checkpointing(("backbone",), policy="some")
    with pytest.raises(SettingError, match="grad_checkpoint_policy"):
        check_settings({"grad_checkpoint_policy": "some"})


def test_high_res_same_gradients_as_no_checkpointing_and_fewer_activation_bytes():
    model, batch = _model(), _batch()
    plain_grads, plain_bytes = _grads_and_activation_bytes(model, batch)
    model.set_gradient_checkpointing(("backbone", "neck"), policy="high_res")
    ckpt_grads, ckpt_bytes = _grads_and_activation_bytes(model, batch)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 100
    for name, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    assert ckpt_bytes < plain_bytes


def test_cli_flag_sets_the_policy():
    from service.commands.train import add_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(), "train", "")
    args = parser.parse_args(["train", "--data", "d.yaml", "--grad-checkpoint", "--grad-checkpoint-policy", "high_res"])
    cfg = config_from_args(args)
    assert (cfg.grad_checkpoint, cfg.grad_checkpoint_policy) == (["backbone", "neck"], "high_res")


def test_the_recipe_checkpoints_the_layers_of_its_configured_policy(tmp_path, monkeypatch):
    """``grad_checkpoint_policy`` reaches the model in ``training.recipe.train`` (it was once read only by the CLI)."""
    from tests.helpers.recipe import tiny_config
    from training.recipe import train

    seen: dict[str, set[int]] = {}
    original = DetectionModel.set_gradient_checkpointing

    def record(self, parts=("backbone", "neck"), policy="all"):
        original(self, parts, policy)
        seen[policy] = set(self.checkpoint_layers)

    monkeypatch.setattr(DetectionModel, "set_gradient_checkpointing", record)
    result = train(tiny_config(tmp_path / "run", max_steps=1, grad_checkpoint=["backbone", "neck"],
                               grad_checkpoint_policy="high_res"))
    assert result.status == "completed"
    assert list(seen) == ["high_res"]
    everything = _model()
    everything.set_gradient_checkpointing(("backbone", "neck"))
    assert seen["high_res"] and seen["high_res"] < everything.checkpoint_layers
