"""Name-driven access to the PEFT methods (for the recipe and HTTP jobs), in the style of timm's registries."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from service.layers.tuners.adapter import AdapterConfig, apply_adapters
from service.layers.tuners.base import UnknownMethodError, mark_trainable, refresh_trainable, root_model
from service.layers.tuners.bitfit import BitFitConfig, apply_bitfit
from service.layers.tuners.dora import DoRAConfig, apply_dora
from service.layers.tuners.lora import LoRAConfig, apply_lora
from service.layers.tuners.qlora import QLoRAConfig, apply_qlora


def _apply_full(model: nn.Module, **settings: Any) -> nn.Module:
    """Full fine-tuning: every parameter trains (no adapter)."""
    if settings:
        from models.errors import ConfigError

        raise ConfigError(f"method 'full' takes no settings, got {sorted(settings)}")
    root, _ = root_model(model)
    mark_trainable(root, [n for n, _ in root.named_parameters()], "full")
    refresh_trainable(root)
    return model


def _apply_none(model: nn.Module, **settings: Any) -> nn.Module:
    """No PEFT: the model is left exactly as it is."""
    if settings:
        from models.errors import ConfigError

        raise ConfigError(f"method 'none' takes no settings, got {sorted(settings)}")
    return model


_METHODS: dict[str, tuple[Callable[..., nn.Module], type | None]] = {
    "lora": (apply_lora, LoRAConfig),
    "dora": (apply_dora, DoRAConfig),
    "qlora": (apply_qlora, QLoRAConfig),
    "bitfit": (apply_bitfit, BitFitConfig),
    "adapters": (apply_adapters, AdapterConfig),
    "full": (_apply_full, None),
    "none": (_apply_none, None),
}


def list_peft_methods() -> list[str]:
    """Every name :func:`apply_peft` accepts."""
    return sorted(_METHODS)


def peft_config_class(method: str) -> type | None:
    """The config dataclass of a method (None for ``full`` / ``none``)."""
    return _lookup(method)[1]


def _lookup(method: str):
    if method not in _METHODS:
        raise UnknownMethodError(f"unknown PEFT method {method!r}; known methods: {', '.join(list_peft_methods())}")
    return _METHODS[method]


def apply_peft(model: nn.Module, method: str, **settings: Any) -> nn.Module:
    """Apply a PEFT method by name with keyword settings (the fields of its config class).

    Example:
        >>> apply_peft(model, "lora", rank=8, targets=["backbone", "neck"], adapter_name="kitchen")
    """
    fn, _ = _lookup(method)
    return fn(model, **settings)
