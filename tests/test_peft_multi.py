"""Several named adapters in one model: set_adapter, combine (linear / TIES / DARE), prune, delete."""

from __future__ import annotations

import pytest
import torch

from models.errors import ConfigError
from service.layers.peft import (
    UnknownAdapterError,
    active_adapters,
    apply_dora,
    apply_lora,
    combine_adapters,
    delete_adapter,
    list_adapters,
    merge_lora,
    prune_adapter,
    set_adapter,
)
from service.layers.tuners.combine import _dare, _ties
from tests.helpers.models import make_model
from tests.helpers.peft import logits, predict, rel_diff

TARGETS = ["model.5.conv", "model.7.conv", "model.16.cv1.conv"]


def _two_adapters():
    model = make_model()
    for i, name in enumerate(("kitchen", "shelf")):
        apply_lora(model, rank=2 + i, targets=TARGETS, adapter_name=name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f"lora_B.{name}." in n:
                    p.normal_(std=0.5, generator=torch.Generator().manual_seed(i))
    return model


def test_set_adapter_switches_and_freezes_the_others():
    model = _two_adapters()
    x = torch.rand(1, 3, 128, 128)
    set_adapter(model, "kitchen")
    assert active_adapters(model) == ["kitchen"]
    assert all(p.requires_grad == (".kitchen." in n) for n, p in model.named_parameters())
    out_k = logits(model, x)
    set_adapter(model, "shelf")
    out_s = logits(model, x)
    assert (out_k - out_s).abs().max() > 1e-3
    set_adapter(model, ["kitchen", "shelf"])
    assert sorted(active_adapters(model)) == ["kitchen", "shelf"]
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'office'; this model holds: kitchen, shelf"):
        set_adapter(model, "office")
    delete_adapter(model, "shelf")
    assert list_adapters(model) == ["kitchen"]


def test_linear_combination_is_the_weighted_sum_of_updates():
    model = _two_adapters()
    x = torch.rand(1, 3, 128, 128)
    set_adapter(model, ["kitchen", "shelf"])
    layer = model.model[5].conv
    expected = 0.3 * layer.get_delta_weight("kitchen") + 0.7 * layer.get_delta_weight("shelf")
    combine_adapters(model, {"kitchen": 0.3, "shelf": 0.7}, method="linear", name="both")
    assert active_adapters(model) == ["both"] and layer.r["both"] == 5
    assert torch.allclose(layer.get_delta_weight("both"), expected, atol=1e-7)
    # linear with weights 1, 1 behaves like both adapters active together
    combine_adapters(model, {"kitchen": 1.0, "shelf": 1.0}, name="sum")
    out_sum = predict(model, x)
    set_adapter(model, ["kitchen", "shelf"])
    assert rel_diff(predict(model, x), out_sum) < 1e-5


def test_ties_and_dare_follow_their_definitions():
    a = torch.tensor([3.0, -1.0, 0.5, -4.0])
    b = torch.tensor([-1.0, 2.0, 0.2, -2.0])
    # density 0.5 keeps a's {3, -4} and b's {2, -2}; signs: +3-0=+ ; 0+2=+ ; 0 ; -6 -> mean of agreeing
    assert torch.allclose(_ties([a, b], 0.5), torch.tensor([3.0, 2.0, 0.0, -3.0]))
    g = torch.Generator().manual_seed(0)
    big = torch.ones(20000)
    dropped = _dare([big], 0.25, g)
    assert set(dropped.unique().tolist()) <= {0.0, 4.0}
    assert abs(float(dropped.mean()) - 1.0) < 0.05  # unbiased rescaling
    model = _two_adapters()
    layer = model.model[7].conv
    for method in ("ties", "dare"):
        name = combine_adapters(model, {"kitchen": 0.5, "shelf": 0.5}, method=method, name=method, density=0.6)
        dense = layer.get_delta_weight(name)
        assert dense.shape == layer.base_layer.weight.shape and dense.abs().sum() > 0
    # with full rank the SVD step is exact
    d_k, d_s = layer.get_delta_weight("kitchen") * 0.5, layer.get_delta_weight("shelf") * 0.5
    combine_adapters(model, {"kitchen": 0.5, "shelf": 0.5}, method="ties", name="ties_full", density=1.0, rank=10**6)
    assert torch.allclose(layer.get_delta_weight("ties_full"), _ties([d_k, d_s], 1.0), atol=1e-6)


def test_combine_errors():
    model = _two_adapters()
    with pytest.raises(ConfigError, match="unknown combine method 'mean'"):
        combine_adapters(model, {"kitchen": 1.0}, method="mean")
    with pytest.raises(UnknownAdapterError):
        combine_adapters(model, {"kitchen": 1.0, "nope": 1.0})
    with pytest.raises(ConfigError, match="density"):
        combine_adapters(model, {"kitchen": 1.0}, method="dare", density=0.0)
    apply_dora(model, rank=2, targets=["model.5.conv"], adapter_name="d")
    with pytest.raises(ConfigError, match="DoRA"):
        combine_adapters(model, {"d": 1.0})


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_prune_sparsity_outside_range_raises(bad):
    model = _two_adapters()
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\)"):
        prune_adapter(model, sparsity=bad)


def test_prune_zeroes_the_smallest_weights():
    model = _two_adapters()
    stats = prune_adapter(model, sparsity=0.5, adapter_name="kitchen")
    a = model.model[5].conv.lora_A["kitchen"].weight
    assert stats["zeroed"] >= stats["total"] // 2 - len(TARGETS) * 2
    assert float((a == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert float((model.model[5].conv.lora_A["shelf"].weight == 0).float().mean()) == 0.0
    with pytest.raises(UnknownAdapterError):
        prune_adapter(model, 0.1, adapter_name="nope")


def test_merge_uses_the_active_adapter_only():
    model = _two_adapters()
    x = torch.rand(1, 3, 128, 128)
    set_adapter(model, "shelf")
    out = predict(model, x)
    merge_lora(model)
    assert rel_diff(predict(model, x), out) <= 1e-5


def test_combined_adapter_saves_and_reloads(tmp_path):
    from service.layers.peft import load_adapter, save_adapter

    model = _two_adapters()
    combine_adapters(model, {"kitchen": 0.5, "shelf": 0.5}, method="dare", name="both", density=0.5)
    save_adapter(model, tmp_path / "both")
    fresh = make_model()
    assert load_adapter(fresh, tmp_path / "both") == "both"
    x = torch.rand(1, 3, 128, 128)
    assert torch.equal(logits(fresh, x), logits(model, x))
