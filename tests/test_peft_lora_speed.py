"""LoRA's composed-kernel forward (one conv with ``W + s * (B (x) A)``) against the adapter-conv path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.layers.tuners.lora import LoRALayer


def _layer(conv: nn.Conv2d, adapters: dict[str, int], dropout: float = 0.0) -> LoRALayer:
    torch.manual_seed(0)
    layer = LoRALayer(conv)
    for i, (name, r) in enumerate(adapters.items()):
        layer.add_lora(name, r, alpha=2.0 * r + i, dropout=dropout)
        nn.init.normal_(layer.lora_B[name].weight, std=0.1)  # B starts at zero; make the adapter count
    layer.active_adapters = list(adapters)
    layer.base_layer.requires_grad_(False)
    return layer


def _adapter_conv_path(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """``base(x) + sum s * B(A(x))``: the three-conv path, written out."""
    out = layer.base_forward(x)
    for name in layer.active_adapters:
        out = out + layer.lora_output(name, x)
    return out


def _grads(layer: LoRALayer, out: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    params = [p for n in layer.active_adapters for p in (layer.lora_A[n].weight, layer.lora_B[n].weight)]
    return list(torch.autograd.grad(out, params, g))


CONVS = {
    "k3-stride2": lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1),
    "k3-dilated-no-bias": lambda: nn.Conv2d(8, 6, 3, padding=2, dilation=2, bias=False),
    "k1": lambda: nn.Conv2d(16, 8, 1),
    "k3-reflect-pad": lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"),
}


LAYOUTS = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}


@pytest.mark.parametrize("make_conv", CONVS.values(), ids=list(CONVS))
@pytest.mark.parametrize("adapters", [{"default": 4}, {"one": 2, "two": 3}], ids=["one-adapter", "two-adapters"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=list(LAYOUTS))
def test_composed_forward_and_adapter_grads_equal_the_adapter_conv_path(make_conv, adapters, layout):
    layer = _layer(make_conv(), adapters).train().to(memory_format=layout)
    assert layer.can_compose(layer.active_adapters)
    x = torch.randn(2, layer.base_layer.in_channels, 11, 13).contiguous(memory_format=layout).requires_grad_()

    composed = layer(x)
    reference = _adapter_conv_path(layer, x)
    torch.testing.assert_close(composed, reference, rtol=1e-5, atol=1e-5)

    g = torch.randn_like(reference)
    for got, want in zip(_grads(layer, composed, g), _grads(layer, reference, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    got_x, = torch.autograd.grad(layer(x), x, g)
    want_x, = torch.autograd.grad(_adapter_conv_path(layer, x), x, g)
    torch.testing.assert_close(got_x, want_x, rtol=1e-4, atol=1e-5)
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=list(LAYOUTS))
def test_composed_weight_is_the_merged_kernel_in_the_weight_s_own_layout(layout):
    """What merging would fold in, built without copying the kernel into another layout (the recipe trains
    channels-last on the CPU)."""
    layer = _layer(nn.Conv2d(8, 12, 3, padding=1), {"one": 2, "two": 3}).to(memory_format=layout)
    merged = layer.base_layer.weight + layer.get_delta_weight("one") + layer.get_delta_weight("two")
    composed = layer.composed_weight(["one", "two"])
    torch.testing.assert_close(composed, merged, rtol=1e-6, atol=1e-6)
    assert composed.is_contiguous(memory_format=layout)


def test_frozen_base_weight_gets_no_grad_and_composition_trains():
    layer = _layer(nn.Conv2d(4, 4, 3, stride=2, padding=1), {"default": 2}).train()
    layer(torch.randn(1, 4, 8, 8)).square().sum().backward()
    assert layer.base_layer.weight.grad is None
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad is not None


def test_dropout_eval_and_no_grad_keep_the_adapter_conv_path():
    assert not _layer(nn.Conv2d(4, 4, 3, padding=1), {"default": 2}, dropout=0.5).train().can_compose(["default"])
    layer = _layer(nn.Conv2d(4, 4, 3, padding=1), {"default": 2})
    assert not layer.eval().can_compose(["default"])  # eval outputs stay HF PEFT's, op for op
    with torch.no_grad():
        assert not layer.train().can_compose(["default"])
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(layer.eval()(x), _adapter_conv_path(layer, x), rtol=0, atol=0)


def test_linear_keeps_the_adapter_path():
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(6, 5))
    layer.add_lora("default", 2, 4.0)
    layer.active_adapters = ["default"]
    assert not layer.can_compose(["default"])


def test_merged_layer_runs_the_merged_base_only():
    layer = _layer(nn.Conv2d(4, 6, 3, stride=2, padding=1), {"default": 3}).train()
    x = torch.randn(2, 4, 9, 9)
    want = _adapter_conv_path(layer, x)
    layer.merge()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
