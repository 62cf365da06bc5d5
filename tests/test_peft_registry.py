"""Methods register themselves: a toy method defined here trains, saves, loads and merges without touching
the package; the model's PEFT state is one object; one predicate says what a PEFT wrapper is."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import pytest
import torch
from torch import nn

from models.errors import ConfigError
from service.layers.peft import (
    BaseTunerLayer,
    PeftState,
    TunerConfig,
    UnknownMethodError,
    apply_bitfit,
    apply_lora,
    apply_peft,
    find_peft_state,
    has_peft_layers,
    is_mergeable,
    is_peft_layer,
    list_adapters,
    list_peft_methods,
    load_adapter,
    merge_lora,
    read_adapter_config,
    register_peft_method,
    save_adapter,
    trainable_report,
    unregister_peft_method,
)
from tests.helpers.models import make_model
from tests.helpers.peft import logits, predict, rel_diff, train_steps


@dataclass
class ToyConfig(TunerConfig):
    """A per-output-channel weight offset: ``W + shift[o] / fan_in`` (mergeable, exact to unmerge)."""

    targets: Sequence[Any] | None = None
    init: float = 0.0
    bn_stats: str | None = None
    peft_type = "toy"


class ToyLayer(BaseTunerLayer):
    adapter_layer_names = ("toy_shift",)
    target_kinds = (nn.Conv2d,)

    def __init__(self, base_layer: nn.Conv2d):
        super().__init__(base_layer)
        self.toy_shift = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: ToyConfig) -> None:
        self.toy_shift[adapter_name] = nn.Parameter(torch.full((self.base_layer.out_channels,), config.init))

    def get_delta_weight(self, name: str) -> torch.Tensor:
        w = self.base_layer.weight
        return self.toy_shift[name].view(-1, 1, 1, 1).expand_as(w) / w[0].numel()

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        weight = self.base_layer.weight
        for name in self.active_adapters:
            weight = weight + self.get_delta_weight(name)
        return self.base_layer._conv_forward(x, weight, self.base_layer.bias)


@pytest.fixture
def toy_method():
    register_peft_method(ToyConfig, ToyLayer)
    yield "toy"
    unregister_peft_method("toy")


def test_a_method_defined_outside_the_package_trains_saves_loads_and_merges(toy_method, tmp_path):
    assert "toy" in list_peft_methods() and is_mergeable("toy")
    model = make_model()
    x = torch.rand(1, 3, 128, 128)
    before = predict(model, x)
    apply_peft(model, "toy", targets=["model.16", "model.19"], adapter_name="kitchen")
    assert torch.equal(predict(model, x), before)  # zero shift: nothing changes
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".toy_shift.kitchen" in n for n in trainable)
    train_steps(model, steps=3, lr=0.5)
    tuned = predict(model, x)
    assert rel_diff(tuned, before) > 1e-4
    assert "toy (kitchen)" in trainable_report(model).by_method

    save_adapter(model, tmp_path / "toy")
    fresh = make_model()
    assert load_adapter(fresh, tmp_path / "toy") == "kitchen"
    assert list_adapters(fresh) == ["kitchen"]
    assert torch.equal(logits(fresh, x), logits(model, x))

    merge_lora(fresh)
    assert not has_peft_layers(fresh)
    assert rel_diff(predict(fresh, x), tuned) <= 1e-5


def test_registration_errors(toy_method):
    with pytest.raises(ConfigError, match="already registered"):
        register_peft_method(ToyConfig, BaseTunerLayer)
    with pytest.raises(ConfigError, match="needs a name"):
        register_peft_method(apply=lambda m: m)
    with pytest.raises(UnknownMethodError, match="known methods"):
        is_mergeable("toy2")
    assert not is_mergeable("adapters") and is_mergeable("lora") and is_mergeable("bitfit")


def test_peft_state_is_one_object_on_the_model():
    model = make_model()
    plain = set(vars(model))
    apply_lora(model, rank=2, targets=["model.5.conv"], adapter_name="a", bn_stats="freeze")
    apply_bitfit(model)
    assert set(vars(model)) - plain == {"peft_state"}
    state = model.peft_state
    assert isinstance(state, PeftState) and list(state.adapters) == ["a"] and "bitfit" in state.methods
    assert state.bn_stats == "freeze" and any(role == "bitfit" for role in state.trainable.values())
    merge_lora(model)
    assert set(vars(model)) == plain


def test_merging_a_deep_copy_keeps_the_originals_frozen_batchnorm():
    """The recipe evaluates a merged deep copy mid-run; the model it keeps training must keep its BN hooks."""
    model = make_model()
    apply_lora(model, rank=2, targets=["neck"], bn_stats="freeze")
    merge_lora(copy.deepcopy(model))
    bn = model.model[0].bn
    before = bn.running_mean.clone()
    train_steps(model, steps=1)
    assert torch.equal(bn.running_mean, before)


def test_is_peft_layer(tmp_path):
    """One predicate, defined in models (which may not import service) and used by DetectionModel.save."""
    from models import peft_layer

    assert is_peft_layer is peft_layer.is_peft_layer and issubclass(BaseTunerLayer, peft_layer.PeftLayer)
    model = make_model()
    assert not any(is_peft_layer(m) for m in model.modules()) and not has_peft_layers(model)
    apply_lora(model, rank=2, targets=["model.5.conv"])
    assert is_peft_layer(model.model[5].conv) and not is_peft_layer(model.model[5].conv.base_layer)
    assert has_peft_layers(model)
    with pytest.raises(ConfigError, match=r"holds 1 PEFT layers \(e.g. model.5.conv\)"):
        model.save(tmp_path / "wrapped")

    class NotPeft(nn.Module):  # a module that merely has a base_layer is not a PEFT layer
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.base_layer = inner

    plain = make_model()
    plain.model[5].conv = NotPeft(plain.model[5].conv)
    assert not has_peft_layers(plain) and plain.save(tmp_path / "plain").is_dir()


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_fine_tuning_saves_and_reloads_through_the_adapter_files(tmp_path):
    model = make_model()
    apply_peft(model, "full")
    everything_but_dfl = {n for n, _ in model.named_parameters() if ".dfl." not in n}
    assert _trainable_names(model) == everything_but_dfl and find_peft_state(model).full_fine_tuning
    train_steps(model, steps=1)
    save_adapter(model, tmp_path / "full")
    desc = read_adapter_config(tmp_path / "full")
    assert desc["method"] is None and desc["methods"]["full"]["exclude"] == ["DFL"]
    assert set(desc["trainable"]) == everything_but_dfl
    fresh = make_model()
    load_adapter(fresh, tmp_path / "full")
    x = torch.rand(1, 3, 128, 128)
    assert torch.equal(logits(fresh, x), logits(model, x))
    assert _trainable_names(fresh) == everything_but_dfl


def test_full_fine_tuning_of_parts_keeps_the_dfl_projection_fixed():
    """The recipe's full fine-tuning is this method: chosen parts train, ultralytics' fixed DFL decoder never does."""
    model = make_model()
    dfl = model.model[-1].dfl.conv.weight.detach().clone()
    apply_peft(model, "full", targets=["head"])
    assert {model.part_of(n) for n in _trainable_names(model)} == {"head"}
    assert not model.model[-1].dfl.conv.weight.requires_grad
    train_steps(model, steps=1)
    assert torch.equal(model.model[-1].dfl.conv.weight, dfl)

    model = make_model()
    apply_peft(model, "full", targets=["backbone"], train_class_branch=True)  # a new class predictor learns too
    head = {n for n in _trainable_names(model) if model.part_of(n) == "head"}
    assert head and all(n.startswith("model.23.cv3.") for n in head)

    model = make_model()
    apply_peft(model, "full", exclude=[])  # nothing excluded: the DFL projection trains as well
    assert _trainable_names(model) == {n for n, _ in model.named_parameters()}
    assert not find_peft_state(make_model()) and not find_peft_state(apply_peft(make_model(), "lora", targets=["model.5.conv"])).full_fine_tuning
    with pytest.raises(ConfigError, match="unknown FullConfig setting"):
        apply_peft(make_model(), "full", rank=4)
