"""BitFit: train only the biases (Ben Zaken et al., 2022), for a conv + BatchNorm network.

YOLO convs have no bias of their own (a BatchNorm follows), so "bias" means the
BatchNorm shift ``beta`` plus every conv / linear bias (the head's last convs).
Nothing is added to the model, so there is nothing to merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from models.errors import ConfigError
from service.layers.tuners.base import TunerConfig, build_config, finish_apply, mark_trainable, resolve_targets, unwrap
from service.layers.tuners.registry import register_peft_method


@dataclass
class BitFitConfig(TunerConfig):
    """Settings of BitFit.

    Attributes:
        targets: parts / module types / name patterns whose biases train (``None``: the module passed).
        bn_weight: also train the BatchNorm scale ``gamma``.
        train_class_branch: make the head's final class predictors fully trainable.
        bn_stats: ``update`` / ``freeze`` BatchNorm running statistics; ``None`` keeps the current choice.
    """

    targets: Sequence[Any] | None = None
    bn_weight: bool = False
    train_class_branch: bool = False
    bn_stats: str | None = None
    peft_type = "bitfit"


def apply_bitfit(module: nn.Module, config: BitFitConfig | None = None, **settings) -> nn.Module:
    """Make biases and BatchNorm shifts trainable (and nothing else that is not already an adapter).

    Example:
        >>> apply_lora(model.backbone, rank=8); apply_bitfit(model)   # LoRA + biases
    """
    config = build_config(BitFitConfig, config, settings)
    kinds = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
    root, resolved = resolve_targets(module, kinds, config.targets)
    names = []
    for name, m in resolved.targets:
        base = unwrap(m)
        prefix = name + (".base_layer" if base is not m else "")
        if getattr(base, "bias", None) is not None:
            names.append(f"{prefix}.bias")
        if config.bn_weight and isinstance(base, nn.modules.batchnorm._BatchNorm) and base.weight is not None:
            names.append(f"{prefix}.weight")
    if not names:
        raise ConfigError("BitFit found no bias in the selected modules; change targets")
    mark_trainable(root, names, "bitfit")
    finish_apply(root, config, None)
    return module


register_peft_method(BitFitConfig, apply=apply_bitfit)
