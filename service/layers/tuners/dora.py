"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), a LoRA variant.

The adapted weight is ``W' = m * (W + dW) / ||W + dW||`` with the norm taken per
output channel, ``dW`` a LoRA update and the magnitude ``m`` a trainable vector
initialised to ``||W||`` (so a fresh adapter changes nothing). :class:`DoraVariant`
is what a :class:`.lora.LoRALayer` runs for an adapter whose config has
``use_dora=True``; merging writes ``W'`` into the base weight and keeps the norm
so unmerging is exact. At most one DoRA adapter is active per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from service.layers.tuners.base import build_config, inject_adapter
from service.layers.tuners.lora import LoRAConfig, LoRALayer, LoraVariant, register_lora_variant, weight_norm
from service.layers.tuners.registry import register_peft_method


@dataclass
class DoRAConfig(LoRAConfig):
    """LoRA settings with ``use_dora=True`` (see :class:`LoRAConfig` for every field)."""

    use_dora: bool = True
    peft_type = "dora"

    def __post_init__(self):
        super().__post_init__()
        self.use_dora = True


class DoraVariant(LoraVariant):
    """``m / ||W + dW||`` per output channel, computed in float32, times ``(W + dW) x``."""

    name = "dora"
    max_active = 1

    def __init__(self):
        self.merged_norm: torch.Tensor | None = None

    def init(self, layer: LoRALayer, name: str) -> None:
        weight = layer.base_weight().detach().float()
        dtype = layer.lora_weights(name)[0].dtype
        layer.lora_magnitude_vector[name] = nn.Parameter(weight_norm(weight).to(device=weight.device, dtype=dtype))

    def scale(self, layer: LoRALayer, name: str, weight: torch.Tensor) -> torch.Tensor:
        norm = weight_norm(weight.float() + layer.get_delta_weight(name).float())
        return layer.lora_magnitude_vector[name].float() / norm

    def forward(self, layer: LoRALayer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # ``result + (s - 1) * Wx + s * dW x`` = ``s * (W + dW) x + b``, in HF PEFT's order of float operations
        # (so an adapter moved between the two libraries gives the same outputs to float rounding).
        scale = layer.channel_view(self.scale(layer, name, layer.base_weight()).to(result.dtype))
        bias = layer.base_layer.bias
        base = result if bias is None else result - layer.channel_view(bias).to(result.dtype)
        lora = layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](x))).to(result.dtype)
        return result + ((scale - 1) * base + scale * lora * layer.scaling[name])

    def merge(self, layer: LoRALayer, name: str, weight: torch.Tensor) -> None:
        delta = layer.get_delta_weight(name).to(weight.dtype)
        self.merged_norm = weight_norm(weight.float() + delta.float())
        scale = (layer.lora_magnitude_vector[name].float() / self.merged_norm).view(-1, *([1] * (weight.dim() - 1)))
        weight.copy_(((weight.float() + delta.float()) * scale).to(weight.dtype))

    def unmerge(self, layer: LoRALayer, name: str, weight: torch.Tensor) -> None:
        delta = layer.get_delta_weight(name).to(weight.dtype)
        scale = (self.merged_norm / layer.lora_magnitude_vector[name].float()).view(-1, *([1] * (weight.dim() - 1)))
        weight.copy_((weight.float() * scale - delta.float()).to(weight.dtype))
        self.merged_norm = None


def apply_dora(module: nn.Module, config: DoRAConfig | None = None, adapter_name: str = "default", **settings) -> nn.Module:
    """Add a DoRA adapter (trainable: LoRA ``A``, ``B`` and the magnitude ``m``).

    Example:
        >>> apply_dora(model, DoRAConfig(rank=8, targets=["backbone"]))
    """
    config = build_config(DoRAConfig, config, settings)
    inject_adapter(module, config, adapter_name, LoRALayer)
    return module


register_lora_variant("dora", DoRAConfig, DoraVariant)
register_peft_method(DoRAConfig, LoRALayer, apply=apply_dora)
