"""What a PEFT wrapper is, defined where ``models`` can see it without importing ``service``.

A PEFT layer wraps the module it adapts (kept as ``base_layer``) and holds adapter
tensors next to it. The layers live in ``service.layers.tuners``, whose base class
``BaseTunerLayer`` subclasses :class:`PeftLayer`; the dependency points one way
(``service`` -> ``models``), and both sides ask the same question with :func:`is_peft_layer`.
"""

from __future__ import annotations

from torch import nn


class PeftLayer(nn.Module):
    """Base class of every PEFT wrapper; ``base_layer`` is the module it wraps."""

    base_layer: nn.Module


def is_peft_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT wrapper (a layer holding adapters around its ``base_layer``)."""
    return isinstance(module, PeftLayer)


def has_peft_layers(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a PEFT wrapper (it must be merged before saving as a plain model)."""
    return any(is_peft_layer(m) for m in model.modules())
