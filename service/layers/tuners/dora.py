"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024).

The adapted weight is ``W' = m * (W + dW) / ||W + dW||`` with the norm taken per
output channel, ``dW`` a LoRA update and the magnitude ``m`` a trainable vector
initialised to ``||W||`` (so a fresh adapter changes nothing). The layer is
:class:`.lora.LoRALayer` with ``use_dora=True``; merging writes ``W'`` into the
base weight and keeps the norm so unmerging is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from service.layers.tuners.lora import LoRAConfig, build_config, inject_lora


@dataclass
class DoRAConfig(LoRAConfig):
    """LoRA settings with ``use_dora=True`` (see :class:`LoRAConfig` for every field)."""

    use_dora: bool = True
    peft_type = "dora"


def apply_dora(module: nn.Module, config: DoRAConfig | None = None, adapter_name: str = "default", **settings) -> nn.Module:
    """Add a DoRA adapter (trainable: LoRA ``A``, ``B`` and the magnitude ``m``).

    Example:
        >>> apply_dora(model, DoRAConfig(rank=8, targets=["backbone"]))
    """
    config = build_config(DoRAConfig, config, settings)
    config.use_dora = True
    inject_lora(module, config, adapter_name)
    return module
