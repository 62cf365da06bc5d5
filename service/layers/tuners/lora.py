"""LoRA (and rsLoRA) for Conv2d and Linear layers.

For a ``Conv2d(k x k, c_in -> c_out)`` the adapter is ``A = Conv2d(k x k, c_in -> r)``
with the base conv's stride / padding / dilation and ``B = Conv2d(1 x 1, r -> c_out)``;
``B`` starts at zero so a fresh adapter changes nothing. The output is
``base(x) + s * B(A(dropout(x)))`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``),
and merging adds ``s * (B (x) A)``, a k x k kernel, to the base weight. Grouped
(e.g. depthwise) convs are skipped when selected by part / type / pattern and
refused when named exactly. The same layer runs DoRA (``use_dora``) and QLoRA
(a quantised base weight, see :mod:`.qlora`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ConfigError
from service.layers.tuners.base import (
    BaseTunerLayer,
    canonical_name,
    check_choice,
    check_new_adapter_name,
    class_branch_modules,
    mark_class_branch,
    peft_state,
    refresh_trainable,
    replace_module,
    resolve_targets,
    set_bn_stats,
    target_to_json,
)

OVERSIZE_CHOICES = ("shrink", "skip", "warn")


@dataclass
class LoRAConfig:
    """Settings of a LoRA adapter.

    Attributes:
        rank: adapter rank ``r`` (> 0); ignored where ``rank_ratio`` is set.
        alpha: scaling numerator; ``None`` means ``alpha = r`` per layer (scale 1).
        rank_ratio: if set, ``r = max(1, round(rank_ratio * min(c_in, c_out)))`` per layer.
        max_share: largest allowed ``adapter parameters / base weight parameters`` per layer
            (``None``: no limit). On YOLO11n a rank-8 adapter outgrows 16-channel convs.
        oversize: what to do where an adapter exceeds ``max_share``: ``shrink`` the rank until it
            fits (skip if rank 1 does not), ``skip`` the layer, or ``warn`` and keep it.
        targets: parts, module types or name patterns to adapt; ``None``: everything in the module
            passed (a part passed as ``model.backbone`` limits it to that part).
        exclude: the same kinds of selectors, removed from ``targets``.
        dropout: dropout probability on the adapter input.
        use_rslora: rank-stabilised scale ``alpha / sqrt(r)``.
        use_dora: weight-decomposed LoRA (see :mod:`.dora`).
        train_class_branch: make the head's final class predictors fully trainable
            (new classes in a new domain); they are then not LoRA targets.
        bn_stats: ``update`` / ``freeze`` BatchNorm running statistics; ``None`` keeps the current choice.
        rank_pattern: exact ``{module name: rank}`` (filled in by apply; used when reloading).
        alpha_pattern: exact ``{module name: alpha}`` (filled in by apply).
    """

    rank: int = 8
    alpha: float | None = None
    rank_ratio: float | None = None
    max_share: float | None = 0.5
    oversize: str = "shrink"
    targets: Sequence[Any] | None = None
    exclude: Sequence[Any] = ()
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    train_class_branch: bool = False
    bn_stats: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    peft_type = "lora"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ConfigError(f"alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}")
        if self.rank_ratio is not None and not (0 < self.rank_ratio <= 1):
            raise ConfigError(f"rank_ratio must be in (0, 1], got {self.rank_ratio!r}")
        if self.max_share is not None and not self.max_share > 0:
            raise ConfigError(f"max_share must be > 0 (or None for no limit), got {self.max_share!r}")
        check_choice(self.oversize, OVERSIZE_CHOICES, "oversize")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bn_stats is not None:
            check_choice(self.bn_stats, ("update", "freeze"), "bn_stats")
        if isinstance(self.targets, (str, type)):
            self.targets = [self.targets]
        if isinstance(self.exclude, (str, type)):
            self.exclude = [self.exclude]
        for k, r in self.rank_pattern.items():
            if not isinstance(r, int) or r <= 0:
                raise ConfigError(f"rank_pattern[{k!r}] must be a positive integer, got {r!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = None if self.targets is None else [target_to_json(t) for t in self.targets]
        d["exclude"] = [target_to_json(t) for t in self.exclude]
        d["peft_type"] = self.peft_type
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoRAConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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


def _refuse_grouped(name: str, module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"a grouped conv (groups={module.groups}) has no single k x k kernel per channel pair; LoRA skips it"
    return None


def _layer_dims(module: nn.Module) -> tuple[int, int, int]:
    """``(c_in, c_out, kernel elements)``."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels, module.kernel_size[0] * module.kernel_size[1]
    return module.in_features, module.out_features, 1


def adapter_share(module: nn.Module, r: int) -> float:
    c_in, c_out, kk = _layer_dims(module)
    return r * (c_in * kk + c_out) / (c_in * c_out * kk)


class LoRALayer(BaseTunerLayer):
    """LoRA / DoRA on a Conv2d or Linear (the base weight may be NF4-quantised)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude")

    def __init__(self, base_layer: nn.Module):
        if not isinstance(base_layer, (nn.Conv2d, nn.Linear)):
            raise ConfigError(f"LoRA supports Conv2d and Linear layers, not {type(base_layer).__name__}")
        if isinstance(base_layer, nn.Conv2d) and base_layer.groups != 1:
            raise ConfigError(f"LoRA cannot adapt a grouped conv (groups={base_layer.groups}); exclude it from targets")
        super().__init__(base_layer)
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.nf4 = None  # an NF4Weight when the base weight is quantised (QLoRA)
        self._dora_norms: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ weights
    def base_weight(self) -> torch.Tensor:
        """The base weight in float (dequantised when the base is NF4 and not merged)."""
        if "weight" in self.base_layer._parameters:
            return self.base_layer.weight
        return self.nf4.dequantize()

    def _base_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.is_conv:
            return self.base_layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    def update_layer(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool) -> None:
        """Add adapter ``name`` with rank ``r``."""
        if self.merged:
            raise ConfigError("cannot add an adapter while others are merged; call unmerge_lora first")
        base = self.base_layer
        weight = self.base_weight()
        kw = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        if self.is_conv:
            a = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                          bias=False, padding_mode=base.padding_mode, **kw)
            b = nn.Conv2d(r, base.out_channels, 1, bias=False, **kw)
        else:
            a = nn.Linear(base.in_features, r, bias=False, **kw)
            b = nn.Linear(r, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name] = int(r)
        self.lora_alpha[name] = float(alpha)
        self.scaling[name] = float(alpha) / (math.sqrt(r) if use_rslora else r)
        self.use_dora[name] = bool(use_dora)
        if use_dora:
            with torch.no_grad():
                self.lora_magnitude[name] = nn.Parameter(weight_norm(weight.detach().float()).to(**kw))

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """``s * (B (x) A)`` shaped like the base weight (a k x k kernel for convs)."""
        a = self.lora_A[name].weight
        b = self.lora_B[name].weight
        if self.is_conv:
            delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
        else:
            delta = b @ a
        return delta * self.scaling[name]

    def _dora_scale(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``m / ||W + dW||`` per output channel, computed in float32."""
        norm = weight_norm(weight.float() + self.get_delta_weight(name).float())
        return self.lora_magnitude[name].float() / norm

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not active:
            if self.nf4 is None or "weight" in self.base_layer._parameters:
                return self.base_layer(x)
            return self._base_forward(x, self.nf4.dequantize(), self.base_layer.bias)
        dora = [a for a in active if self.use_dora[a]]
        if len(dora) > 1:
            raise ConfigError(f"only one DoRA adapter can be active at a time, got {dora}")
        weight = self.base_weight()
        bias = self.base_layer.bias
        if not dora and self.nf4 is None:
            result = self.base_layer(x)
        else:
            result = self._base_forward(x, weight, None)
        for name in sorted(active, key=lambda n: not self.use_dora[n]):  # DoRA first, as merge does
            lora = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]
            if self.use_dora[name]:
                scale = self._dora_scale(name, weight).to(result.dtype)
                scale = scale.view(1, -1, 1, 1) if self.is_conv else scale
                result = scale * (result + lora.to(result.dtype))
            else:
                result = result + lora.to(result.dtype)
        if (dora or self.nf4 is not None) and bias is not None:
            result = result + (bias.view(1, -1, 1, 1) if self.is_conv else bias).to(result.dtype)
        return result

    # ------------------------------------------------------------------ merge
    def _ensure_weight_param(self) -> None:
        if "weight" not in self.base_layer._parameters:
            self.base_layer.weight = nn.Parameter(self.nf4.dequantize().detach().clone(), requires_grad=False)

    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight; DoRA ones first."""
        names = [n for n in (self.active_adapters if names is None else names) if n in self.lora_A and n not in self.merged_adapters]
        if self.nf4 is not None:
            self._ensure_weight_param()
        if not names:
            return
        w = self.base_layer.weight
        for name in sorted(names, key=lambda n: not self.use_dora[n]):
            delta = self.get_delta_weight(name).to(w.dtype)
            if self.use_dora[name]:
                norm = weight_norm(w.float() + delta.float())
                self._dora_norms[name] = norm
                scale = (self.lora_magnitude[name].float() / norm).view(-1, *([1] * (w.dim() - 1)))
                w.copy_(((w.float() + delta.float()) * scale).to(w.dtype))
            else:
                w.add_(delta)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Exact inverse of :meth:`merge` (to float rounding)."""
        if not self.merged_adapters:
            return
        w = self.base_layer.weight
        for name in reversed(self.merged_adapters):
            delta = self.get_delta_weight(name).to(w.dtype)
            if self.use_dora[name]:
                norm = self._dora_norms.pop(name)
                scale = (norm / self.lora_magnitude[name].float()).view(-1, *([1] * (w.dim() - 1)))
                w.copy_((w.float() * scale - delta.float()).to(w.dtype))
            else:
                w.sub_(delta)
        self.merged_adapters = []
        if self.nf4 is not None:
            del self.base_layer.weight  # back to the quantised weight, bit for bit

    def unload(self) -> nn.Module:
        if self.nf4 is not None:
            self._ensure_weight_param()
        return self.base_layer


def weight_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel's weights (DoRA's column norm)."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1)


def plan_ranks(config: LoRAConfig, targets: list[tuple[str, nn.Module]]) -> tuple[dict[str, int], dict[str, str]]:
    """Rank per module after ``rank_ratio`` and the ``max_share`` rule; skipped modules with reasons."""
    ranks: dict[str, int] = {}
    skipped: dict[str, str] = {}
    shrunk: list[str] = []
    for name, module in targets:
        base = module.base_layer if isinstance(module, BaseTunerLayer) else module
        c_in, c_out, _ = _layer_dims(base)
        if canonical_name(name) in config.rank_pattern:
            ranks[name] = config.rank_pattern[canonical_name(name)]
            continue
        r = max(1, round(config.rank_ratio * min(c_in, c_out))) if config.rank_ratio else config.rank
        if config.max_share is not None and adapter_share(base, r) > config.max_share:
            if config.oversize == "skip":
                skipped[name] = f"rank {r} would be {adapter_share(base, r):.0%} of the layer (max_share {config.max_share:.0%})"
                continue
            if config.oversize == "shrink":
                while r > 1 and adapter_share(base, r) > config.max_share:
                    r -= 1
                if adapter_share(base, r) > config.max_share:
                    skipped[name] = f"even rank 1 exceeds max_share {config.max_share:.0%} of the layer"
                    continue
                shrunk.append(f"{name}->r{r}")
            else:
                warnings.warn(f"LoRA on {name}: rank {r} is {adapter_share(base, r):.0%} of the layer (max_share {config.max_share:.0%})")
        ranks[name] = r
    if shrunk:
        warnings.warn(
            f"LoRA rank lowered on {len(shrunk)} small layer(s) to stay within max_share={config.max_share} "
            f"({', '.join(shrunk[:4])}{', ...' if len(shrunk) > 4 else ''}); set max_share=None to keep the rank"
        )
    return ranks, skipped


def inject_lora(module: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> dict[str, Any]:
    """Wrap the selected Conv2d / Linear layers and add adapter ``adapter_name``; returns a summary."""
    from service.layers.tuners.base import root_model

    root, _ = root_model(module)
    check_new_adapter_name(root, adapter_name)
    exclude = list(config.exclude)
    if config.train_class_branch:
        exclude += class_branch_modules(root)
    if config.rank_pattern and config.targets is None:
        targets: Sequence[Any] | None = list(config.rank_pattern)
    else:
        targets = config.targets
    root, resolved = resolve_targets(module, (nn.Conv2d, nn.Linear), targets, exclude, accept=_refuse_grouped)
    ranks, too_big = plan_ranks(config, resolved.targets)
    if not ranks:
        raise ConfigError("no layer left to adapt (all selected layers were skipped: "
                          f"{dict(list({**resolved.skipped, **too_big}.items())[:3])}); change targets, rank or max_share")
    layers = dict(resolved.targets)
    for name, r in ranks.items():
        layer = layers[name]
        if not isinstance(layer, LoRALayer):
            if isinstance(layer, BaseTunerLayer):
                raise ConfigError(f"{name} already holds a {type(layer).__name__}; LoRA cannot wrap it")
            layer = LoRALayer(layer)
            replace_module(root, name, layer)
        alpha = config.alpha_pattern.get(canonical_name(name), config.alpha if config.alpha is not None else float(r))
        layer.update_layer(adapter_name, r, alpha, config.dropout, config.use_rslora, config.use_dora)
        layer.active_adapters.append(adapter_name)
    config.alpha_pattern = {
        canonical_name(n): float(config.alpha_pattern.get(canonical_name(n), config.alpha if config.alpha is not None else r))
        for n, r in ranks.items()
    }
    config.rank_pattern = {canonical_name(n): r for n, r in ranks.items()}
    peft_config, _ = peft_state(root)
    peft_config[adapter_name] = config.to_dict()
    if config.train_class_branch:
        mark_class_branch(root)
    set_bn_stats(root, config.bn_stats)
    refresh_trainable(root)
    return {"adapted": list(ranks), "skipped": {**resolved.skipped, **too_big}}


def apply_lora(module: nn.Module, config: LoRAConfig | None = None, adapter_name: str = "default", **settings) -> nn.Module:
    """Add a LoRA adapter to ``module`` (a DetectionModel, one of its parts, or any nn.Module).

    Example:
        >>> apply_lora(model.backbone, rank=8)
        >>> apply_lora(model, LoRAConfig(rank=16, alpha=32, targets=["backbone", "neck"]), adapter_name="kitchen")

    Afterwards only adapter parameters (and the class branch if asked) require grad.
    Returns ``module``.
    """
    config = build_config(LoRAConfig, config, settings)
    inject_lora(module, config, adapter_name)
    return module


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """LoRA+ (Hayou et al., 2024): optimizer groups where LoRA ``B`` matrices learn ``ratio`` times faster.

    Every other trainable parameter (``A``, DoRA magnitudes, biases, class branch) gets ``lr``.

    Example:
        >>> torch.optim.AdamW(lora_plus_param_groups(model, lr=1e-3, ratio=16))
    """
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr!r}")
    if not ratio > 0:
        raise ConfigError(f"ratio must be > 0, got {ratio!r}")
    b_ids = {id(p) for m in model.modules() if isinstance(m, LoRALayer) for b in m.lora_B.values() for p in b.parameters()}
    fast, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (fast if id(p) in b_ids else rest).append(p)
    if not fast and not rest:
        raise ConfigError("no parameter requires grad; apply a PEFT method first")
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if fast:
        groups.append({"params": fast, "lr": lr * ratio, "weight_decay": weight_decay})
    return groups
