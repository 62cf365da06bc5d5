"""Optimizer-in-backward (gradient discarding): step each parameter as soon as its gradient is ready.

Each trainable parameter gets its own optimizer; a post-accumulate-grad hook
steps it and frees the gradient at once, so at most one parameter's gradient is
alive at a time. Because the gradient is gone by the end of ``backward()``, this
cannot be combined with gradient accumulation or global-norm clipping —
:func:`check_in_backward_compatible` refuses both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.optim import Optimizer

from models.errors import ConfigError


def check_in_backward_compatible(accumulate: int = 1, clip_grad_norm: float | None = None) -> None:
    """Raise ``ConfigError`` if optimizer-in-backward cannot run with these training settings."""
    if accumulate is not None and int(accumulate) > 1:
        raise ConfigError(
            f"optimizer-in-backward steps and frees each gradient during backward, so it cannot accumulate "
            f"gradients over {accumulate} micro-batches; set accumulate=1 or turn in_backward off"
        )
    if clip_grad_norm is not None and clip_grad_norm > 0:
        raise ConfigError(
            "optimizer-in-backward cannot clip by the global gradient norm (the gradients are never all alive at "
            "once); set clip_grad_norm to None/0 or turn in_backward off"
        )


class _ChainedState(Mapping):
    """Read-only view of the per-parameter optimizers' ``state`` as one mapping (param -> state)."""

    def __init__(self, optimizers: Iterable[Optimizer]):
        self._optimizers = list(optimizers)

    def __getitem__(self, p):
        for opt in self._optimizers:
            if p in opt.state:
                return opt.state[p]
        raise KeyError(p)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for opt in self._optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._optimizers)


class InBackwardOptimizer(Optimizer):
    """The handle :func:`optimizer_in_backward` returns.

    It looks like one optimizer to the training loop: ``param_groups`` are the
    per-parameter optimizers' groups (so LR schedulers work on it), ``state``
    chains their states, ``step()`` and ``zero_grad()`` do nothing (the hooks did
    the work), ``state_dict()`` / ``load_state_dict()`` are keyed by parameter name.
    """

    def __init__(self, optimizers: dict[str, Optimizer], handles: list[Any]):
        # Optimizer.__init__ would re-register the parameters; set up just what schedulers and callers read.
        self.optimizers = optimizers
        self._handles = handles
        self.defaults = {}
        self.param_groups = [g for opt in optimizers.values() for g in opt.param_groups]
        # a read-only view where torch declares a defaultdict: nothing writes an in-backward optimizer's state
        self.state = _ChainedState(optimizers.values())  # type: ignore[assignment]
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    def step(self, closure: Callable[[], float] | None = None):
        """Nothing to do: every parameter was stepped in its hook. Runs ``closure`` if given."""
        return None if closure is None else closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the hooks already freed every gradient."""

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = sorted(set(self.optimizers) - set(state_dict))
        if missing:
            raise ConfigError(f"optimizer state has no entry for {len(missing)} parameters, e.g. {missing[:3]}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])

    def remove(self) -> None:
        """Remove the hooks (the parameters go back to ordinary gradients)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        kinds = sorted({type(o).__name__ for o in self.optimizers.values()})
        return f"InBackwardOptimizer({len(self.optimizers)} parameters, {', '.join(kinds)})"


def optimizer_in_backward(
    model: nn.Module | None,
    make_optimizer: Callable[[list], Optimizer],
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None = None,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
) -> InBackwardOptimizer:
    """Step every trainable parameter inside its post-accumulate-grad hook and free its gradient.

    Args:
        model: names the parameters (state-dict keys); its trainable parameters are used when ``params`` is None.
        make_optimizer: builds one optimizer from a one-element parameter list (or one-group list).
        params: tensors or parameter groups (their settings are kept per parameter).
        accumulate, clip_grad_norm: the training loop's settings; refused unless 1 / None (see
            :func:`check_in_backward_compatible`).
    """
    check_in_backward_compatible(accumulate, clip_grad_norm)
    if params is None:
        if model is None:
            raise ConfigError("optimizer_in_backward needs a model or a parameter list")
        params = [p for p in model.parameters() if p.requires_grad]
    groups = [g if isinstance(g, dict) else {"params": [g]} for g in params]
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    optimizers: dict[str, Optimizer] = {}
    handles = []
    index = 0
    for group in groups:
        group_params = group["params"]
        group_params = [group_params] if torch.is_tensor(group_params) else list(group_params)
        settings = {k: v for k, v in group.items() if k != "params"}
        for p in group_params:
            if not p.requires_grad:
                continue
            name = names.get(id(p), f"param{index}")
            index += 1
            opt = make_optimizer([{"params": [p], **settings}] if settings else [p])
            optimizers[name] = opt

            def hook(param: torch.Tensor, opt: Optimizer = opt) -> None:
                opt.step()
                opt.zero_grad(set_to_none=True)

            handles.append(p.register_post_accumulate_grad_hook(hook))
    if not optimizers:
        raise ConfigError("optimizer_in_backward got no trainable parameters; unfreeze something first")
    return InBackwardOptimizer(optimizers, handles)
