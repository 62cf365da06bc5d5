"""QLoRA: LoRA on top of a frozen base stored in 4-bit NF4 (see :mod:`.nf4`).

Every adapted layer's base weight is replaced by an :class:`NF4Weight` (codes +
block scales) and dequantised to float32 in each forward; biases and BatchNorm
stay in float. Merging dequantises into a plain float32 weight and adds the LoRA
update; unmerging drops that weight again, returning to the exact NF4 codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.errors import ConfigError
from service.layers.tuners.base import iter_tuner_layers, root_model
from service.layers.tuners.lora import LoRAConfig, LoRALayer, build_config, inject_lora
from service.layers.tuners.nf4 import NF4Weight


@dataclass
class QLoRAConfig(LoRAConfig):
    """LoRA settings plus the base-weight quantisation.

    Attributes:
        bits: bits per base weight; only 4 (NF4) is supported.
        blocksize: weights per absmax block.
        double_quant: store the block scales as int8 (saves ~0.4 bits per weight).
    """

    rank: int = 16
    bits: int = 4
    blocksize: int = 64
    double_quant: bool = True
    peft_type = "qlora"

    def __post_init__(self):
        super().__post_init__()
        if self.bits != 4:
            raise ConfigError(f"QLoRA stores the base in 4-bit NF4; bits={self.bits} is not supported")
        if self.use_dora:
            raise ConfigError("QLoRA with use_dora is not supported; use apply_dora on a float base")
        if self.blocksize <= 0 or self.blocksize % 2:
            raise ConfigError(f"blocksize must be a positive even number, got {self.blocksize}")


def quantize_layer(layer: LoRALayer, blocksize: int = 64, double_quant: bool = True) -> None:
    """Store ``layer``'s base weight as NF4 and drop the float copy."""
    if layer.nf4 is not None:
        return
    if layer.merged:
        raise ConfigError("unmerge the layer before quantising its base weight")
    weight = layer.base_layer.weight
    layer.nf4 = NF4Weight(weight.detach(), blocksize=blocksize, double_quant=double_quant)
    del layer.base_layer.weight


def apply_qlora(module: nn.Module, config: QLoRAConfig | None = None, adapter_name: str = "default", **settings) -> nn.Module:
    """Quantise the targeted layers' base weights to NF4 and add LoRA on top.

    Example:
        >>> apply_qlora(model, QLoRAConfig(rank=16, bits=4, double_quant=True))
    """
    config = build_config(QLoRAConfig, config, settings)
    summary = inject_lora(module, config, adapter_name)
    root, _ = root_model(module)
    adapted = set(summary["adapted"])
    for name, layer in iter_tuner_layers(root):
        if name in adapted and isinstance(layer, LoRALayer):
            quantize_layer(layer, config.blocksize, config.double_quant)
    return module


def quantized_bytes(module: nn.Module) -> tuple[int, int]:
    """``(bytes of the NF4 weights, bytes the same weights take in float32)`` over all quantised layers."""
    stored = fp32 = 0
    for m in module.modules():
        if isinstance(m, NF4Weight):
            stored += m.storage_bytes()
            fp32 += m.numel * torch.finfo(torch.float32).bits // 8
    return stored, fp32
