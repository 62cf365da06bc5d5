"""What every PEFT method shares: the wrapper base class, target resolution, the PEFT state a model carries.

A PEFT layer *wraps* the module it adapts: the original module lives on as
``base_layer`` (so its parameters keep their values and types) and the adapter
tensors sit next to it, keyed by adapter name. A *canonical* name is a module or
parameter name with every ``.base_layer`` removed: the name it has in the plain
model, which is also the key adapter files use.

A model carries three plain attributes (no tensors) once a method is applied:
``peft_config`` (adapter name -> its settings), ``peft_trainable`` (canonical
parameter name -> role, for base parameters a method makes trainable such as
BitFit biases or the class branch) and ``peft_bn_stats`` (``"update"`` /
``"freeze"``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from models.errors import ConfigError, NotFoundError

PARTS = ("backbone", "neck", "head")
BN_STATS_CHOICES = ("update", "freeze")
_BASE_SEGMENT = re.compile(r"(^|\.)base_layer(?=\.|$)")


class UnknownAdapterError(ConfigError, NotFoundError):
    """An adapter name the model does not hold (a ConfigError and a NotFoundError)."""


class UnknownMethodError(ConfigError, NotFoundError):
    """A PEFT method name that is not registered."""


def canonical_name(name: str) -> str:
    """``model.3.conv.base_layer.weight`` -> ``model.3.conv.weight`` (the name in the plain model)."""
    out = _BASE_SEGMENT.sub("", name)
    return out[1:] if out.startswith(".") else out


class BaseTunerLayer(nn.Module):
    """A module wrapping ``base_layer`` with one or more named adapters.

    Subclasses own ``adapter_layer_names`` (the ModuleDict / ParameterDict
    attributes holding adapter tensors), ``update_layer``, ``get_delta_weight``,
    ``merge`` and ``unmerge``.
    """

    adapter_layer_names: tuple[str, ...] = ()
    #: Whether ``merge`` can fold the adapter into ``base_layer``'s weights.
    mergeable: bool = True

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []

    @property
    def adapter_names(self) -> list[str]:
        first = getattr(self, self.adapter_layer_names[0])
        return list(first.keys())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """``(local name, parameter)`` of one adapter, local names without the adapter key."""
        for attr in self.adapter_layer_names:
            holder = getattr(self, attr)
            if name not in holder:
                continue
            item = holder[name]
            if isinstance(item, nn.Parameter):
                yield attr, item
            else:
                for pname, p in item.named_parameters():
                    yield f"{attr}.{pname}", p

    def set_adapter(self, names: Sequence[str]) -> None:
        if self.merged:
            raise ConfigError("cannot switch adapters while some are merged into the weights; call unmerge_lora first")
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ConfigError(f"adapter {name!r} is merged into the weights; call unmerge_lora before deleting it")
        for attr in self.adapter_layer_names:
            holder = getattr(self, attr)
            if name in holder:
                del holder[name]
        for attr in ("r", "lora_alpha", "scaling", "use_dora", "hidden", "adapter_scale"):
            table = getattr(self, attr, None)
            if isinstance(table, dict):
                table.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def unload(self) -> nn.Module:
        """The plain module to put back in the model (after merging)."""
        return self.base_layer


def iter_tuner_layers(root: nn.Module) -> Iterator[tuple[str, BaseTunerLayer]]:
    for name, module in root.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, module


def walk_base_modules(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, list[nn.Module]]]:
    """Yield ``(name, module, ancestors)`` for every module, a tuner layer standing for its base layer.

    Nothing inside a tuner layer (its adapter convs, its base layer) is yielded:
    a wrapped conv appears once, as the wrapper, under its own name.
    """

    def visit(module: nn.Module, name: str, ancestors: list[nn.Module]):
        yield name, module, ancestors
        if isinstance(module, BaseTunerLayer):
            if getattr(module, "wraps_block", False):  # a whole block wrapped: its convs stay selectable
                yield from visit(module.base_layer, f"{name}.base_layer", ancestors + [module])
            return
        for child_name, child in module._modules.items():
            if child is not None:
                yield from visit(child, f"{name}.{child_name}" if name else child_name, ancestors + [module])

    yield from visit(root, prefix, [])


def unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, BaseTunerLayer):
        module = module.base_layer
    return module


# ---------------------------------------------------------------------------- the model a part belongs to
def _is_part(module: nn.Module) -> bool:
    return hasattr(module, "part_name") and hasattr(module, "prefix")


def root_model(module: nn.Module) -> tuple[nn.Module, list[str] | None]:
    """The whole model ``module`` belongs to and the parts it covers (None: all of it).

    ``model.backbone`` is a ModelPart view sharing the model's layers; the PEFT
    state (which parameters train, adapter configs) is the whole model's, so
    methods applied to a part work on its model, limited to that part.
    """
    if not _is_part(module):
        return module, None
    ref = getattr(module, "root", None)
    root = ref() if ref is not None else None
    if root is None:
        raise ConfigError(f"the {module.part_name} view has lost its model; pass the DetectionModel itself")
    return root, [module.part_name]


def part_of(root: nn.Module, name: str) -> str:
    """The part (backbone / neck / head) of a canonical name; ``other`` outside a DetectionModel's layers."""
    bounds = getattr(root, "part_bounds", None)
    pieces = name.split(".")
    if bounds is None or len(pieces) < 2 or pieces[0] != "model" or not pieces[1].isdigit():
        return "other"
    index = int(pieces[1])
    for part, (start, stop) in bounds.items():
        if start <= index < stop:
            return part
    return "other"


def layer_index(name: str) -> int | None:
    pieces = name.split(".")
    return int(pieces[1]) if len(pieces) > 1 and pieces[0] == "model" and pieces[1].isdigit() else None


# ---------------------------------------------------------------------------- target resolution
@dataclass
class Resolved:
    """Modules a config selects: ``targets`` to adapt, ``skipped`` (name -> why)."""

    targets: list[tuple[str, nn.Module]]
    skipped: dict[str, str]


def _type_names(root: nn.Module) -> set[str]:
    return {type(unwrap(m)).__name__ for m in root.modules()}


def _selects(target: Any, name: str, module: nn.Module, ancestors: list[nn.Module], root: nn.Module, type_names: set[str]) -> bool:
    if isinstance(target, type):
        chain = [unwrap(module)] + ancestors
        return any(isinstance(m, target) for m in chain)
    if target in PARTS:
        return part_of(root, name) == target
    if target in type_names and not any(ch in target for ch in ".*?["):
        chain = [unwrap(module)] + ancestors
        return any(type(m).__name__ == target for m in chain)
    return name == target or name.startswith(target + ".") or fnmatch.fnmatchcase(name, target)


def check_target_spec(root: nn.Module, targets: Iterable[Any], what: str = "target") -> None:
    """Raise if a target is a part name on a model without parts or not a name/type/pattern at all."""
    for t in targets:
        if not isinstance(t, (str, type)):
            raise ConfigError(f"{what} {t!r} must be a part name, a module-name pattern or a module type")
        if t in PARTS and not hasattr(root, "part_bounds"):
            raise ConfigError(f"{what} {t!r} is a DetectionModel part, but this model has no parts; use module names or types")


def resolve_targets(
    module: nn.Module,
    kinds: tuple[type, ...],
    targets: Sequence[Any] | None,
    exclude: Sequence[Any] = (),
    accept=None,
) -> tuple[nn.Module, Resolved]:
    """Pick the modules of types ``kinds`` that ``targets`` select inside ``module``.

    A target is a part (``backbone`` / ``neck`` / ``head``), a module type (a
    class such as ``nn.Conv2d`` or a class name such as ``"C2PSA"``: every
    module of that type or inside one), or a module name / glob pattern
    (``model.10``, ``model.*.cv1.conv``). A target that selects nothing is an
    error listing what exists. ``accept(name, module)`` returns None to keep a
    candidate or a reason to skip it; an exactly named module that would be
    skipped is an error instead.
    """
    root, scope_parts = root_model(module)
    if targets is None or len(targets) == 0:
        targets = scope_parts or [""]
    check_target_spec(root, targets)
    check_target_spec(root, exclude, "exclude entry")
    type_names = _type_names(root)
    everything = [(n, m, a) for n, m, a in walk_base_modules(root)]
    candidates = [
        (n, m, a)
        for n, m, a in everything
        if n and isinstance(unwrap(m), kinds) and not getattr(m, "wraps_block", False)
        and (scope_parts is None or part_of(root, canonical_name(n)) in scope_parts)
    ]
    chosen: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for t in targets:
        if t == "":
            hits = candidates
        else:
            hits = [c for c in candidates if _selects(t, canonical_name(c[0]), c[1], c[2], root, type_names)]
        if not hits:
            names = [canonical_name(n) for n, _, _ in everything if n][:6]
            parts = ", ".join(PARTS) if hasattr(root, "part_bounds") else "(none: not a DetectionModel)"
            kinds_txt = "/".join(k.__name__ for k in kinds)
            raise ConfigError(
                f"target {t!r} selects no {kinds_txt} module"
                + (f" inside the {', '.join(scope_parts)}" if scope_parts else "")
                + f"; valid targets are a part ({parts}), a module type (e.g. {', '.join(sorted(type_names)[:8])}) "
                f"or a module name / glob pattern (e.g. {', '.join(names)})"
            )
        for n, m, a in hits:
            if exclude and any(_selects(e, canonical_name(n), m, a, root, type_names) for e in exclude):
                continue
            reason = accept(n, unwrap(m)) if accept is not None else None
            if reason is not None:
                if isinstance(t, str) and t == canonical_name(n):
                    raise ConfigError(f"{n} cannot take this adapter: {reason}")
                skipped[n] = reason
                continue
            chosen[n] = m
    return root, Resolved(list(chosen.items()), skipped)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# ---------------------------------------------------------------------------- model-level PEFT state
def peft_state(root: nn.Module) -> tuple[dict[str, dict], dict[str, str]]:
    """``(peft_config, peft_trainable)`` of a model, created empty on first use."""
    if not isinstance(getattr(root, "peft_config", None), dict):
        root.peft_config = {}
    if not isinstance(getattr(root, "peft_trainable", None), dict):
        root.peft_trainable = {}
    return root.peft_config, root.peft_trainable


def check_new_adapter_name(root: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter_name must be a non-empty string without dots, got {name!r}")
    config, _ = peft_state(root)
    if name in config:
        raise ConfigError(f"the model already has an adapter named {name!r}; pass another adapter_name or delete_adapter first")


def class_branch_modules(root: nn.Module) -> list[str]:
    """Names of the head's final class predictors (one 1x1 conv per level, ``model.<head>.cv3.<i>.<last>``)."""
    layers = getattr(root, "model", None)
    head = layers[-1] if isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) else None
    if head is None or not hasattr(head, "cv3"):
        raise ConfigError("train_class_branch needs a DetectionModel (a Detect head with a class branch cv3)")
    out = []
    for i, branch in enumerate(head.cv3):
        last = len(branch) - 1
        out.append(f"model.{len(layers) - 1}.cv3.{i}.{last}")
    return out


def mark_trainable(root: nn.Module, param_names: Iterable[str], role: str) -> int:
    """Record base parameters (canonical names) that train alongside adapters."""
    _, trainable = peft_state(root)
    n = 0
    for name in param_names:
        trainable[canonical_name(name)] = role
        n += 1
    return n


def mark_class_branch(root: nn.Module) -> list[str]:
    names = class_branch_modules(root)
    params = [f"{m}.{p}" for m in names for p, _ in root.get_submodule(m).named_parameters()]
    mark_trainable(root, params, "class_branch")
    return names


def refresh_trainable(root: nn.Module) -> None:
    """Set ``requires_grad``: active, unmerged adapter tensors and recorded base parameters train; nothing else.

    Inactive adapters are frozen so DistributedDataParallel never sees a
    trainable parameter that the forward does not use.
    """
    _, trainable = peft_state(root)
    adapter_ids: dict[int, bool] = {}
    for _, layer in iter_tuner_layers(root):
        for adapter in layer.adapter_names:
            on = adapter in layer.active_adapters and not layer.merged
            for _, p in layer.adapter_parameters(adapter):
                adapter_ids[id(p)] = on
    for name, p in root.named_parameters():
        if id(p) in adapter_ids:
            p.requires_grad_(adapter_ids[id(p)])
        else:
            p.requires_grad_(canonical_name(name) in trainable)


def _bn_eval_hook(module: nn.Module, args):
    # Normalise with (and keep) the base model's running statistics even in train mode.
    module.training = False


def set_bn_stats(root: nn.Module, mode: str | None) -> None:
    """``update``: BatchNorm running statistics follow the new domain (and are saved with the adapter);
    ``freeze``: every BatchNorm normalises with the base model's statistics and never changes them.
    ``None`` keeps the current choice (``update`` by default)."""
    if mode is None:
        if getattr(root, "peft_bn_stats", None) is None:
            root.peft_bn_stats = "update"
        return
    if mode not in BN_STATS_CHOICES:
        raise ConfigError(f"bn_stats must be one of {', '.join(BN_STATS_CHOICES)}, got {mode!r}")
    hooks = getattr(root, "_peft_bn_hooks", None) or {}
    for handle in hooks.values():
        handle.remove()
    hooks = {}
    if mode == "freeze":
        for name, m in root.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                hooks[name] = m.register_forward_pre_hook(_bn_eval_hook)
    root._peft_bn_hooks = hooks
    root.peft_bn_stats = mode


def clear_bn_hooks(root: nn.Module) -> None:
    for handle in (getattr(root, "_peft_bn_hooks", None) or {}).values():
        handle.remove()
    root._peft_bn_hooks = {}


def check_choice(value: Any, choices: Sequence[Any], field: str) -> None:
    if value not in choices:
        raise ConfigError(f"{field} must be one of {', '.join(map(str, choices))}, got {value!r}")


def target_to_json(t: Any) -> str:
    return t.__name__ if isinstance(t, type) else str(t)


def base_weight_numel(module: nn.Module) -> int:
    w = getattr(module, "weight", None)
    return int(w.numel()) if isinstance(w, torch.Tensor) else 0
