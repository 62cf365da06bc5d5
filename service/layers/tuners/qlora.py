"""QLoRA: LoRA on top of a frozen base stored in 4-bit NF4 (see :mod:`.nf4`).

:class:`QLoRALayer` is a :class:`.lora.LoRALayer` whose base weight is an
:class:`NF4Weight` (codes + block scales), dequantised to float32 in each
forward; biases and BatchNorm stay in float. Merging dequantises into a plain
float32 weight and adds the LoRA update; unmerging drops that weight again,
returning to the exact NF4 codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.errors import ConfigError
from service.layers.tuners.base import build_config, inject_adapter
from service.layers.tuners.lora import LoRAConfig, LoRALayer
from service.layers.tuners.nf4 import NF4Weight
from service.layers.tuners.registry import register_peft_method


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


class QLoRALayer(LoRALayer):
    """LoRA over an NF4-quantised base weight (``nf4``; ``base_layer`` keeps only its bias)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.nf4: NF4Weight | None = None

    def quantize(self, blocksize: int = 64, double_quant: bool = True) -> None:
        """Store the base weight as NF4 and drop the float copy (no-op when already quantised)."""
        if self.nf4 is not None:
            return
        if self.merged:
            raise ConfigError("unmerge the layer before quantising its base weight")
        self.nf4 = NF4Weight(self.base_layer.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        del self.base_layer.weight

    def update_layer(self, adapter_name: str, config: LoRAConfig, r: int, alpha: float) -> None:
        super().update_layer(adapter_name, config, r, alpha)
        self.quantize(getattr(config, "blocksize", 64), getattr(config, "double_quant", True))

    def _nf4_only(self) -> NF4Weight | None:
        """The NF4 weight while it is the only base weight (None: a float weight exists)."""
        return None if "weight" in self.base_layer._parameters else self.nf4

    def base_weight(self) -> torch.Tensor:
        """The base weight in float (dequantised while not merged)."""
        nf4 = self._nf4_only()
        return self.base_layer.weight if nf4 is None else nf4.dequantize()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        nf4 = self._nf4_only()
        if nf4 is None:
            return super().base_forward(x)
        return self._apply_weight(x, nf4.dequantize(), self.base_layer.bias)

    def _ensure_weight_param(self) -> None:
        nf4 = self._nf4_only()
        if nf4 is not None:
            self.base_layer.weight = nn.Parameter(nf4.dequantize().detach().clone(), requires_grad=False)

    @torch.no_grad()
    def merge(self, names=None) -> None:
        self._ensure_weight_param()
        super().merge(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        super().unmerge()
        if self.nf4 is not None:
            del self.base_layer.weight  # back to the quantised weight, bit for bit

    def stored_base_tensors(self) -> list[tuple[str, tuple[int, ...], int, str]]:
        nf4 = self._nf4_only()
        if nf4 is None:
            return []
        return [("weight", tuple(nf4.shape), nf4.storage_bytes(), "base (NF4, frozen)")]

    def can_unwrap(self) -> bool:
        return self.nf4 is None  # the float weight is gone: the wrapper stays to hold the NF4 copy

    def unload(self) -> nn.Module:
        self._ensure_weight_param()
        return self.base_layer


def quantize_layer(layer: QLoRALayer, blocksize: int = 64, double_quant: bool = True) -> None:
    """Store ``layer``'s base weight as NF4 and drop the float copy."""
    layer.quantize(blocksize, double_quant)


def apply_qlora(module: nn.Module, config: QLoRAConfig | None = None, adapter_name: str = "default", **settings) -> nn.Module:
    """Quantise the targeted layers' base weights to NF4 and add LoRA on top.

    Example:
        >>> apply_qlora(model, QLoRAConfig(rank=16, bits=4, double_quant=True))
    """
    config = build_config(QLoRAConfig, config, settings)
    inject_adapter(module, config, adapter_name, QLoRALayer)
    return module


def quantized_bytes(module: nn.Module) -> tuple[int, int]:
    """``(bytes of the NF4 weights, bytes the same weights take in float32)`` over all quantised layers."""
    stored = fp32 = 0
    for m in module.modules():
        if isinstance(m, NF4Weight):
            stored += m.storage_bytes()
            fp32 += m.numel * torch.finfo(torch.float32).bits // 8
    return stored, fp32


register_peft_method(QLoRAConfig, QLoRALayer, apply=apply_qlora)
