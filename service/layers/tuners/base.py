"""What every PEFT method shares: the wrapper base class, target resolution, the PEFT state a model carries.

A PEFT layer *wraps* the module it adapts: the original module lives on as
``base_layer`` (so its parameters keep their values and types) and the adapter
tensors sit next to it, keyed by adapter name. A *canonical* name is a module or
parameter name with every ``.base_layer`` removed: the name it has in the plain
model, which is also the key adapter files use.

A model's PEFT state (which adapters it holds and their settings, the base
parameters that train, the BatchNorm statistics choice) is one
:class:`PeftState` object, stored as the single attribute ``peft_state`` of the
model. A new method is a config dataclass (a :class:`TunerConfig`) plus a layer
(a :class:`BaseTunerLayer`); :func:`inject_adapter` does the rest, and
``registry.register_peft_method`` makes it known by name.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import torch
from torch import nn

from models.errors import ConfigError, NotFoundError
from models.parts import PARTS
from models.peft_layer import PeftLayer, has_peft_layers, is_peft_layer  # noqa: F401  (re-exported: one definition)

#: What BatchNorm running statistics do while adapters train (see :func:`set_bn_stats`).
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


# ---------------------------------------------------------------------------- configs
def _jsonable(value: Any) -> Any:
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class TunerConfig:
    """What every method's config dataclass shares (mix it into a ``@dataclass``).

    A subclass sets ``peft_type`` (the method's registered name) and may define
    ``targets`` / ``exclude`` (selectors, see :func:`resolve_targets`),
    ``train_class_branch`` and ``bn_stats``, which :func:`inject_adapter` honours.
    Methods with per-module settings override :meth:`plan` and :meth:`record`.
    """

    peft_type: ClassVar[str] = ""
    __dataclass_fields__: ClassVar[dict[str, Any]]  # every subclass is a dataclass (what ``fields`` / ``replace`` need)

    def __post_init__(self):
        for attr in ("targets", "exclude"):
            value = getattr(self, attr, None)
            if isinstance(value, (str, type)):
                setattr(self, attr, [value])
        bn_stats = getattr(self, "bn_stats", None)
        if bn_stats is not None:
            check_choice(bn_stats, BN_STATS_CHOICES, "bn_stats")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (types by class name) plus ``peft_type``."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """The config from :meth:`to_dict` output; keys that are not fields are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def for_reload(self):
        """A config that rebuilds exactly the layers this one built (used by ``load_adapter``)."""
        return replace(self)

    def target_selectors(self) -> Sequence[Any] | None:
        return getattr(self, "targets", None)

    def plan(self, targets: list[tuple[str, nn.Module]]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Per-module keyword settings for ``update_layer`` and the modules skipped (name -> why)."""
        return {name: {} for name, _ in targets}, {}

    def record(self, plan: dict[str, dict[str, Any]]) -> None:
        """Store the exact per-module settings of ``plan`` (so a reload rebuilds the same layers)."""


def build_config(cls, config, kwargs: dict[str, Any]):
    """A config from ``config`` and/or keyword settings; unknown settings are an error listing the known ones."""
    known = [f.name for f in fields(cls)]
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} setting(s) {unknown}; known: {', '.join(known)}")
    if config is None:
        return cls(**kwargs)
    if not isinstance(config, cls):
        raise ConfigError(f"expected a {cls.__name__}, got {type(config).__name__}")
    return replace(config, **kwargs) if kwargs else replace(config)


# ---------------------------------------------------------------------------- layers
class BaseTunerLayer(PeftLayer):
    """A module wrapping ``base_layer`` with one or more named adapters (a ``models.peft_layer.PeftLayer``).

    A subclass declares ``target_kinds`` (module types it can wrap),
    ``adapter_layer_names`` (ModuleDict / ParameterDict attributes holding the
    adapters' trainable tensors, the first one listing every adapter) and
    ``other_param_names`` (other per-adapter tables: dicts or ModuleDicts), and
    implements ``update_layer(adapter_name, config, **settings)`` and ``forward``.
    Merging: either ``get_delta_weight(name)`` (an update of ``base_layer.weight``,
    merged additively by default) or ``mergeable = False``.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    target_kinds: tuple[type, ...] = (nn.Module,)
    #: Whether ``merge`` can fold the adapter into ``base_layer``'s weights.
    mergeable: bool = True
    #: True for wrappers of whole blocks: the convs inside stay selectable by other methods.
    wraps_block: bool = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []

    @classmethod
    def refuse(cls, name: str, module: nn.Module) -> str | None:
        """Why ``module`` cannot take this layer's adapters (None: it can)."""
        return None

    @classmethod
    def wrap(cls, existing: nn.Module) -> "BaseTunerLayer":
        """The layer of this class for ``existing``: a new wrapper, ``existing`` itself, or ``existing``'s
        adapters moved into a wrapper of this (more specific) class."""
        if isinstance(existing, cls):
            return existing
        if not isinstance(existing, BaseTunerLayer):
            return cls(existing)
        if not issubclass(cls, type(existing)):
            raise ConfigError(f"this module already holds a {type(existing).__name__}; a {cls.__name__} cannot wrap it")
        if existing.merged:
            raise ConfigError("cannot add an adapter while others are merged; call unmerge_lora first")
        new = cls(existing.base_layer)
        for attr in existing.adapter_layer_names + existing.other_param_names + ("active_adapters",):
            setattr(new, attr, getattr(existing, attr))
        return new

    #: ``update_layer(adapter_name, config, **settings)`` adds one adapter; each method declares its own config
    #: class and the keyword settings its config's ``plan`` produces.
    update_layer: Callable[..., None]

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

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """What an adapter file stores for adapter ``name`` (local name -> tensor); default: its parameters."""
        return {k: p.detach() for k, p in self.adapter_parameters(name)}

    def describe(self, name: str) -> dict[str, Any]:
        """Per-module facts an adapter file records (e.g. the rank)."""
        return {}

    def set_adapter(self, names: Sequence[str]) -> None:
        if self.merged:
            raise ConfigError("cannot switch adapters while some are merged into the weights; call unmerge_lora first")
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ConfigError(f"adapter {name!r} is merged into the weights; call unmerge_lora before deleting it")
        for attr in self.adapter_layer_names + self.other_param_names:
            holder = getattr(self, attr)
            if name in holder:
                del holder[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    # ------------------------------------------------------------------ merge (additive by default)
    def get_delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no weight update to merge")

    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into ``base_layer.weight``."""
        if not self.mergeable:
            raise ConfigError(f"{type(self).__name__} adapters cannot be merged into weights")
        names = [n for n in (self.active_adapters if names is None else names)
                 if n in self.adapter_names and n not in self.merged_adapters]
        w = self.base_layer.get_parameter("weight")
        for name in names:
            w.add_(self.get_delta_weight(name).to(w.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Exact inverse of :meth:`merge` (to float rounding)."""
        if not self.merged_adapters:
            return
        w = self.base_layer.get_parameter("weight")
        for name in reversed(self.merged_adapters):
            w.sub_(self.get_delta_weight(name).to(w.dtype))
        self.merged_adapters = []

    def can_unwrap(self) -> bool:
        """Whether the wrapper may be replaced by its base module once it holds no adapter."""
        return True

    def stored_base_tensors(self) -> list[tuple[str, tuple[int, ...], int, str]]:
        """Base weights held in another form than a parameter: ``(local name, original shape, bytes, label)``."""
        return []

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
    return root, [str(module.part_name)]


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
STATE_ATTR = "peft_state"


@dataclass
class PeftState:
    """Everything PEFT records about a model (plain data, no tensors), held as ``model.peft_state``.

    Attributes:
        adapters: adapter name -> its method's settings (``TunerConfig.to_dict()``, with ``peft_type``).
        trainable: canonical base-parameter name -> role (``bitfit``, ``class_branch``, ``full``) for
            base parameters that train alongside adapters.
        methods: settings of methods that add no named adapter (BitFit), by method name.
        bn_stats: ``update`` / ``freeze`` (see :func:`set_bn_stats`).
    """

    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    trainable: dict[str, str] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    bn_stats: str = "update"

    @property
    def full_fine_tuning(self) -> bool:
        """Whether the ``full`` method was applied: the trained weights are the model's own, so the model
        (merged) is the result and there is no adapter smaller than it to save."""
        return "full" in self.methods


def peft_state(root: nn.Module) -> PeftState:
    """The model's :class:`PeftState`, created empty on first use."""
    state = root.__dict__.get(STATE_ATTR)
    if not isinstance(state, PeftState):
        state = PeftState()
        root.__dict__[STATE_ATTR] = state
    return state


def find_peft_state(root: nn.Module) -> PeftState | None:
    """The model's :class:`PeftState`, or None when no method was ever applied."""
    state = root.__dict__.get(STATE_ATTR)
    return state if isinstance(state, PeftState) else None


def clear_peft_state(root: nn.Module) -> None:
    """Forget every PEFT record and BatchNorm hook: the model is a plain model again."""
    root.__dict__.pop(STATE_ATTR, None)
    _remove_bn_hooks(root)


def check_new_adapter_name(root: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter_name must be a non-empty string without dots, got {name!r}")
    if name in peft_state(root).adapters:
        raise ConfigError(f"the model already has an adapter named {name!r}; pass another adapter_name or delete_adapter first")


def class_branch_modules(root: nn.Module) -> list[str]:
    """Names of the head's final class predictors (one 1x1 conv per level, ``model.<head>.cv3.<i>.<last>``)."""
    layers = getattr(root, "model", None)
    cv3 = getattr(layers[-1], "cv3", None) if isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) else None
    if layers is None or not isinstance(cv3, nn.ModuleList):
        raise ConfigError("train_class_branch needs a DetectionModel (a Detect head with a class branch cv3)")
    return [f"model.{len(layers) - 1}.cv3.{i}.{len(list(branch.children())) - 1}" for i, branch in enumerate(cv3)]


def mark_trainable(root: nn.Module, param_names: Iterable[str], role: str) -> int:
    """Record base parameters (canonical names) that train alongside adapters."""
    trainable = peft_state(root).trainable
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
    trainable = peft_state(root).trainable
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


def _remove_bn_hooks(root: nn.Module) -> None:
    # The hooks are found in each BatchNorm's own hook table (no handles kept), so a deep copy of the
    # model carries its own hooks and removing them from the copy leaves the original untouched.
    for m in root.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for key in [k for k, fn in m._forward_pre_hooks.items() if fn is _bn_eval_hook]:
                del m._forward_pre_hooks[key]


def set_bn_stats(root: nn.Module, mode: str | None) -> None:
    """``update``: BatchNorm running statistics follow the new domain (and are saved with the adapter);
    ``freeze``: every BatchNorm normalises with the base model's statistics and never changes them.
    ``None`` keeps the current choice (``update`` by default)."""
    state = peft_state(root)
    if mode is None:
        return
    check_choice(mode, BN_STATS_CHOICES, "bn_stats")
    _remove_bn_hooks(root)
    if mode == "freeze":
        for m in root.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.register_forward_pre_hook(_bn_eval_hook)
    state.bn_stats = mode


def check_choice(value: Any, choices: Sequence[Any], field: str) -> None:
    if value not in choices:
        raise ConfigError(f"{field} must be one of {', '.join(map(str, choices))}, got {value!r}")


def target_to_json(t: Any) -> str:
    return t.__name__ if isinstance(t, type) else str(t)


def base_weight_numel(module: nn.Module) -> int:
    w = getattr(module, "weight", None)
    return int(w.numel()) if isinstance(w, torch.Tensor) else 0


# ---------------------------------------------------------------------------- injection
def finish_apply(root: nn.Module, config: TunerConfig, adapter_name: str | None) -> None:
    """Record ``config`` in the model's state, mark the class branch, set BatchNorm statistics, set requires_grad."""
    state = peft_state(root)
    if adapter_name is None:
        state.methods[config.peft_type] = config.to_dict()
    else:
        state.adapters[adapter_name] = config.to_dict()
    if getattr(config, "train_class_branch", False):
        mark_class_branch(root)
    set_bn_stats(root, getattr(config, "bn_stats", None))
    refresh_trainable(root)


def inject_adapter(module: nn.Module, config: TunerConfig, adapter_name: str, layer_class: type[BaseTunerLayer]) -> dict[str, Any]:
    """Wrap the modules ``config`` selects in ``layer_class`` and add adapter ``adapter_name`` to each.

    ``config.plan`` gives each selected module's settings for ``layer_class.update_layer``
    (and may skip some); the class branch is never a target when ``train_class_branch`` is set.
    Returns ``{"adapted": [names], "skipped": {name: why}}``.
    """
    root, _ = root_model(module)
    check_new_adapter_name(root, adapter_name)
    exclude = list(getattr(config, "exclude", None) or ())
    if getattr(config, "train_class_branch", False):
        exclude += class_branch_modules(root)
    root, resolved = resolve_targets(module, layer_class.target_kinds, config.target_selectors(), exclude,
                                     accept=layer_class.refuse)
    plan, too_big = config.plan(resolved.targets)
    skipped = {**resolved.skipped, **too_big}
    if not plan:
        raise ConfigError(f"no layer left to adapt (all selected layers were skipped: {dict(list(skipped.items())[:3])}); "
                          "change the targets or settings")
    layers = dict(resolved.targets)
    for name, settings in plan.items():
        try:
            layer = layer_class.wrap(layers[name])
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
        if layer is not layers[name]:
            replace_module(root, name, layer)
        layer.update_layer(adapter_name, config, **settings)
        layer.active_adapters.append(adapter_name)
    config.record(plan)
    finish_apply(root, config, adapter_name)
    return {"adapted": list(plan), "skipped": skipped}
