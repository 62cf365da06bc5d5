"""Model-level adapter operations: which adapters are active, merge / unmerge, delete."""

from __future__ import annotations

import copy
from typing import Sequence, TypeVar

from torch import nn

from models.errors import ConfigError
from service.layers.tuners.base import (
    UnknownAdapterError,
    clear_peft_state,
    has_peft_layers,
    iter_tuner_layers,
    peft_state,
    refresh_trainable,
    replace_module,
    root_model,
)

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of every adapter the model holds."""
    root, _ = root_model(model)
    return list(peft_state(root).adapters)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters that are active in at least one layer."""
    root, _ = root_model(model)
    seen: list[str] = []
    for _, layer in iter_tuner_layers(root):
        seen += [a for a in layer.active_adapters if a not in seen]
    return seen


def check_adapter_names(root: nn.Module, names: Sequence[str]) -> None:
    known = list(peft_state(root).adapters)
    for n in names:
        if n not in known:
            raise UnknownAdapterError(f"unknown adapter {n!r}; this model holds: {', '.join(known) or 'no adapters'}")


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly ``names`` active (one name or several); others stay in the model, frozen and unused.

    Example:
        >>> set_adapter(model, "kitchen")
    """
    root, _ = root_model(model)
    names = [names] if isinstance(names, str) else list(names)
    check_adapter_names(root, names)
    for _, layer in iter_tuner_layers(root):
        layer.set_adapter(names)
    refresh_trainable(root)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a wrapper left with no adapter is replaced by its base module
    (except QLoRA layers, whose base stays quantised)."""
    root, _ = root_model(model)
    check_adapter_names(root, [name])
    for lname, layer in list(iter_tuner_layers(root)):
        if name in layer.adapter_names:
            layer.delete_adapter(name)
        if not layer.adapter_names and layer.can_unwrap():
            replace_module(root, lname, layer.unload())
    peft_state(root).adapters.pop(name)
    refresh_trainable(root)


def merged_copy(model: ModuleT) -> ModuleT:
    """A deep copy with every adapter folded into its base weights and the wrappers removed (NF4 bases come
    back as float32): a plain model to save or export. ``model`` itself is untouched."""
    out = copy.deepcopy(model)
    return merge_lora(out) if has_peft_layers(out) else out


def merge_lora(model: ModuleT, adapter_names: Sequence[str] | None = None, unload: bool = True) -> ModuleT:
    """Fold adapters into the base weights.

    With ``unload=True`` (default) every PEFT wrapper is removed afterwards: the
    model holds only its original module types (state-dict keys and shapes equal
    the base model's; NF4 bases come back as float32), so it saves, loads and
    exports as a plain model. Unmerged adapters not named are dropped then.
    With ``unload=False`` the wrappers stay and :func:`unmerge_lora` undoes it.

    Example:
        >>> merge_lora(model); model.save("runs/kitchen/merged")
    """
    root, _ = root_model(model)
    if adapter_names is not None:
        check_adapter_names(root, list(adapter_names))
    layers = list(iter_tuner_layers(root))
    blocking = [n for n, layer in layers if not layer.mergeable and layer.adapter_names]
    if blocking:
        raise ConfigError(
            f"the adapters in {blocking[:3]} cannot be merged into weights (bottleneck adapters follow a "
            "nonlinearity); delete_adapter them first, or save them with save_adapter and keep the wrapped model"
        )
    # Innermost wrappers first, so an outer wrapper's base block already holds plain modules.
    for name, layer in sorted(layers, key=lambda x: -x[0].count(".")):
        if layer.mergeable:
            layer.merge(adapter_names)
        if unload:
            replace_module(root, name, layer.unload())
    if unload:
        clear_peft_state(root)
        for p in root.parameters():  # a plain model again: everything trainable, as after construction
            p.requires_grad_(True)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract merged adapters again (exact to float rounding); needs ``merge_lora(..., unload=False)``."""
    root, _ = root_model(model)
    layers = list(iter_tuner_layers(root))
    if not any(layer.merged for _, layer in layers):
        raise ConfigError("nothing to unmerge: no adapter is merged (merge_lora(model, unload=False) keeps them unmergeable)")
    for _, layer in layers:
        layer.unmerge()
    refresh_trainable(root)
    return model
