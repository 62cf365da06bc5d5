"""Memory-efficient optimizers and a registry to build them by name.

``build_optimizer(name, params, ...)`` in the style of timm's ``create_optimizer_v2``:
``adamw`` (``torch.optim.AdamW``), ``coap`` / ``coap8bit`` (:class:`COAPAdamW`),
``galore`` (:class:`GaLoreAdamW`), ``adamw8bit`` (:class:`AdamW8bit`); ``in_backward=True``
wraps any of them with :func:`optimizer_in_backward`.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
from torch import nn

from models.errors import ConfigError, NotFoundError
from training.optim.adamw8bit import AdamW8bit
from training.optim.coap import COAPAdamW
from training.optim.galore import GaLoreAdamW
from training.optim.in_backward import InBackwardOptimizer, check_in_backward_compatible, optimizer_in_backward
from training.optim.lowrank import ProjectedAdamW

__all__ = [
    "AdamW8bit",
    "COAPAdamW",
    "GaLoreAdamW",
    "InBackwardOptimizer",
    "ProjectedAdamW",
    "build_optimizer",
    "check_in_backward_compatible",
    "list_optimizers",
    "optimizer_in_backward",
]

# name -> (class, fixed settings)
_REGISTRY: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adamw": (torch.optim.AdamW, {}),
    "coap": (COAPAdamW, {}),
    "coap8bit": (COAPAdamW, {"eight_bit": True}),
    "galore": (GaLoreAdamW, {}),
    "adamw8bit": (AdamW8bit, {}),
}


def list_optimizers() -> list[str]:
    """Every name :func:`build_optimizer` accepts."""
    return list(_REGISTRY)


def _check_kwargs(cls: type, name: str, kw: dict[str, Any]) -> None:
    accepted = set(inspect.signature(cls).parameters) - {"params"}
    unknown = sorted(set(kw) - accepted)
    if unknown:
        raise ConfigError(
            f"optimizer {name!r} does not take {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}"
        )


def build_optimizer(
    name: str,
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    in_backward: bool = False,
    model: nn.Module | None = None,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
    **kw: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer called ``name`` over ``params``.

    Args:
        name: one of :func:`list_optimizers`.
        params: tensors or parameter groups (as for ``torch.optim``).
        lr, weight_decay: the usual settings; further keyword arguments go to the optimizer class
            (e.g. ``rank_ratio_cnn``, ``update_interval`` for COAP).
        in_backward: step each parameter in its post-accumulate-grad hook (see
            :func:`optimizer_in_backward`); ``model`` then names the parameters.
        accumulate, clip_grad_norm: the loop's settings, checked only when ``in_backward`` (which refuses
            accumulation > 1 and global-norm clipping).
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in _REGISTRY:
        raise NotFoundError(f"unknown optimizer {name!r}; known: {', '.join(list_optimizers())}")
    cls, fixed = _REGISTRY[key]
    _check_kwargs(cls, name, {**kw, **fixed})
    settings = {"lr": lr, "weight_decay": weight_decay, **kw, **fixed}
    param_list: list[Any] = list(params)
    if not param_list:
        raise ConfigError(f"optimizer {name!r} got an empty parameter list; pass the model's trainable parameters")
    if not in_backward:
        return cls(param_list, **settings)

    counter = iter(range(1 << 62))

    def make(group_params: list) -> torch.optim.Optimizer:
        opt = cls(group_params, **settings)
        if isinstance(opt, ProjectedAdamW):
            opt.param_index_offset = next(counter)
        return opt

    return optimizer_in_backward(model, make, params=param_list, accumulate=accumulate, clip_grad_norm=clip_grad_norm)

