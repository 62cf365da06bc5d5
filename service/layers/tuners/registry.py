"""PEFT methods by name (HF PEFT's ``register_peft_method``, timm's ``register``).

A method registers itself from its own module::

    register_peft_method(ToyConfig, ToyLayer)            # a wrapping method: generic apply
    register_peft_method(BitFitConfig, apply=apply_bitfit)  # its own apply function

and is then usable by name everywhere: :func:`apply_peft`, ``save_adapter`` /
``load_adapter`` (which rebuild it from its recorded config), merging (through
the layer's ``mergeable`` flag, see :func:`is_mergeable`) and the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from torch import nn

from models.errors import ConfigError
from service.layers.tuners.base import (
    BaseTunerLayer,
    TunerConfig,
    UnknownMethodError,
    build_config,
    canonical_name,
    finish_apply,
    inject_adapter,
    mark_trainable,
    resolve_targets,
)

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class PeftMethod:
    """A registered method.

    Attributes:
        name: what :func:`apply_peft` and adapter files call it.
        config_class: its settings dataclass (None for ``none``).
        apply: ``apply(module, config=None, [adapter_name=...,] **settings) -> module``.
        layer_class: the wrapper it injects (None: it adds no layer, e.g. BitFit).
        mergeable: whether ``merge_lora`` can fold it into plain weights.
    """

    name: str
    config_class: type[TunerConfig] | None
    apply: Callable[..., nn.Module]
    layer_class: type[BaseTunerLayer] | None = None
    mergeable: bool = True

    @property
    def named(self) -> bool:
        """Whether it adds a named adapter (``adapter_name``) rather than training base parameters."""
        return self.layer_class is not None


_METHODS: dict[str, PeftMethod] = {}


def _generic_apply(config_class: type[TunerConfig], layer_class: type[BaseTunerLayer]) -> Callable[..., nn.Module]:
    def apply(module: nn.Module, config=None, adapter_name: str = "default", **settings) -> nn.Module:
        inject_adapter(module, build_config(config_class, config, settings), adapter_name, layer_class)
        return module

    apply.__name__ = f"apply_{config_class.peft_type}"
    apply.__doc__ = f"Add a {config_class.peft_type} adapter ({config_class.__name__} settings) to ``module``."
    return apply


def register_peft_method(
    config_class: type[TunerConfig] | None = None,
    layer_class: type[BaseTunerLayer] | None = None,
    *,
    name: str | None = None,
    apply: Callable[..., nn.Module] | None = None,
    mergeable: bool | None = None,
    replace: bool = False,
) -> PeftMethod:
    """Make a method known by name (default: ``config_class.peft_type``).

    With a ``layer_class`` and no ``apply``, applying the method wraps the modules
    the config's ``targets`` select (see ``base.inject_adapter``). ``mergeable``
    defaults to the layer's flag. Registering a taken name is an error unless
    ``replace=True``.
    """
    name = name or getattr(config_class, "peft_type", None)
    if not name or not isinstance(name, str):
        raise ConfigError("a PEFT method needs a name: pass name= or give its config class a peft_type")
    if apply is None:
        if config_class is None or layer_class is None:
            raise ConfigError(f"method {name!r}: pass apply=, or both a config class and a layer class")
        apply = _generic_apply(config_class, layer_class)
    if mergeable is None:
        mergeable = layer_class.mergeable if layer_class is not None else True
    method = PeftMethod(name, config_class, apply, layer_class, bool(mergeable))
    old = _METHODS.get(name)
    if old is not None and not replace and (old.config_class, old.layer_class) != (config_class, layer_class):
        raise ConfigError(f"a PEFT method named {name!r} is already registered ({old.config_class}); pass replace=True")
    _METHODS[name] = method
    return method


def unregister_peft_method(name: str) -> None:
    """Forget a method (for tests and plugins that add one temporarily)."""
    _lookup(name)
    del _METHODS[name]


def get_peft_method(name: str) -> PeftMethod:
    """The registered method ``name``; an unknown name raises UnknownMethodError listing the known ones."""
    return _lookup(name)


def list_peft_methods() -> list[str]:
    """Every name :func:`apply_peft` accepts."""
    return sorted(_METHODS)


def peft_config_class(method: str) -> type[TunerConfig] | None:
    """The config dataclass of a method (None for ``none``)."""
    return _lookup(method).config_class


def is_mergeable(method: str) -> bool:
    """Whether a model tuned with ``method`` can be merged into plain weights (``merge_lora``, export).

    Example:
        >>> is_mergeable("lora"), is_mergeable("adapters")
        (True, False)
    """
    return _lookup(method).mergeable


def _lookup(method: str) -> PeftMethod:
    if method not in _METHODS:
        raise UnknownMethodError(f"unknown PEFT method {method!r}; known methods: {', '.join(list_peft_methods())}")
    return _METHODS[method]


def apply_peft(model: ModuleT, method: str, **settings: Any) -> ModuleT:
    """Apply a PEFT method by name with keyword settings (the fields of its config class).

    Example:
        >>> apply_peft(model, "lora", rank=8, targets=["backbone", "neck"], adapter_name="kitchen")
    """
    _lookup(method).apply(model, **settings)  # every method works in place and returns the module it was given
    return model


@dataclass
class FullConfig(TunerConfig):
    """Settings of full fine-tuning: the selected modules' own weights train; no adapter is added.

    Attributes:
        targets: parts / module types / name patterns whose parameters train (``None``: the module passed).
        exclude: modules kept frozen. Default: ultralytics' DFL projection, a fixed decoder (an ``arange``
            integral) that ultralytics' trainer always freezes.
        train_class_branch: also train the head's final class predictors (a new class predictor outside ``targets``).
    """

    targets: Sequence[Any] | None = None
    exclude: Sequence[Any] = ("DFL",)
    train_class_branch: bool = False
    peft_type = "full"


def apply_full(module: nn.Module, config: FullConfig | None = None, **settings: Any) -> nn.Module:
    """Full fine-tuning: every parameter of the selected modules trains (recorded in the model's PEFT state).

    Example:
        >>> apply_peft(model, "full", targets=["neck", "head"])   # the backbone stays frozen
    """
    config = build_config(FullConfig, config, settings)
    root, resolved = resolve_targets(module, (nn.Module,), config.targets, config.exclude)
    chosen = {canonical_name(name) for name, _ in resolved.targets}
    names = [name for name, _ in root.named_parameters() if canonical_name(name).rpartition(".")[0] in chosen]
    mark_trainable(root, names, "full")
    finish_apply(root, config, None)
    return module


def _apply_none(model: nn.Module, **settings: Any) -> nn.Module:
    """No PEFT: the model is left exactly as it is."""
    if settings:
        raise ConfigError(f"method 'none' takes no settings, got {sorted(settings)}")
    return model


register_peft_method(FullConfig, apply=apply_full)
register_peft_method(name="none", apply=_apply_none)
