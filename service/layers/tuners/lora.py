"""LoRA (and rsLoRA) for Conv2d and Linear layers: the core the LoRA variants build on.

For a ``Conv2d(k x k, c_in -> c_out)`` the adapter is ``A = Conv2d(k x k, c_in -> r)``
with the base conv's stride / padding / dilation and ``B = Conv2d(1 x 1, r -> c_out)``;
``B`` starts at zero so a fresh adapter changes nothing. The output is
``base(x) + s * B(A(dropout(x)))`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``),
and merging adds ``s * (B (x) A)``, a k x k kernel, to the base weight. While training
without dropout, the forward runs base conv and adapters as one conv with the kernel
``W + s * (B (x) A)`` (:meth:`LoRALayer.composed_forward`; fewer ops per step). Grouped
(e.g. depthwise) convs are skipped when selected by part / type / pattern and
refused when named exactly.

Variants, as in HF PEFT's ``resolve_lora_variant``: an adapter whose config asks
for DoRA gets a :class:`LoraVariant` (:mod:`.dora`) that changes its forward,
merge and unmerge; a quantised base weight is its own layer class
(:class:`.qlora.QLoRALayer`). This module knows neither beyond the hook.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import CheckpointError, ConfigError
from service.layers.tuners.base import (
    BaseTunerLayer,
    TunerConfig,
    build_config,
    canonical_name,
    check_choice,
    inject_adapter,
)
from service.layers.tuners.registry import register_peft_method

OVERSIZE_CHOICES = ("shrink", "skip", "warn")


@dataclass
class LoRAConfig(TunerConfig):
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
        super().__post_init__()
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
        for k, r in self.rank_pattern.items():
            if not isinstance(r, int) or r <= 0:
                raise ConfigError(f"rank_pattern[{k!r}] must be a positive integer, got {r!r}")

    def alpha_for(self, name: str, r: int) -> float:
        """The scale numerator of module ``name`` (canonical) at rank ``r``: the pattern, else ``alpha``, else ``r``."""
        if name in self.alpha_pattern:
            return float(self.alpha_pattern[name])
        return float(self.alpha if self.alpha is not None else r)

    def target_selectors(self) -> Sequence[Any] | None:
        if self.rank_pattern and self.targets is None:
            return list(self.rank_pattern)
        return self.targets

    def plan(self, targets):
        ranks, skipped = plan_ranks(self, targets)
        return {n: {"r": r, "alpha": self.alpha_for(canonical_name(n), r)} for n, r in ranks.items()}, skipped

    def record(self, plan) -> None:
        self.rank_pattern = {canonical_name(n): s["r"] for n, s in plan.items()}
        self.alpha_pattern = {canonical_name(n): s["alpha"] for n, s in plan.items()}

    def for_reload(self):
        """Exactly the recorded modules, ranks and alphas (no target search, no size rule)."""
        out = super().for_reload()
        out.targets, out.exclude, out.max_share, out.rank_ratio = None, (), None, None
        return out

    #: the ``peft_type`` HF PEFT knows this method by (its adapter files are then HF PEFT files)
    hf_peft_type = "LORA"

    @classmethod
    def hf_peft_fields(cls, settings: dict[str, Any], modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """HF PEFT ``LoraConfig`` fields for an adapter with recorded ``settings`` and per-module facts.

        Every module is listed in ``rank_pattern`` / ``alpha_pattern`` with its name
        escaped as a regex and longer names first, so HF PEFT's first-match suffix rule
        picks exactly the module's own entry.
        """
        order = sorted(modules, key=lambda n: (-n.count("."), n))
        rank = int(settings.get("rank") or 8)
        alpha = settings.get("alpha")
        return {
            "peft_type": cls.hf_peft_type, "task_type": None, "r": rank,
            "lora_alpha": float(alpha if alpha is not None else rank),
            "target_modules": sorted(modules),
            "rank_pattern": {re.escape(n): int(modules[n]["rank"]) for n in order},
            "alpha_pattern": {re.escape(n): float(modules[n]["alpha"]) for n in order},
            "use_rslora": bool(settings.get("use_rslora", False)),
            "use_dora": any(bool(m.get("use_dora")) for m in modules.values()),
            "lora_dropout": float(settings.get("dropout") or 0.0),
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        }


#: HF PEFT LoraConfig options that change what a LoRA adapter is; files using them are refused.
HF_UNSUPPORTED = {"fan_in_fan_out": False, "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
                  "lora_bias": False, "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
                  "use_bdlora": None, "alora_invocation_tokens": None}


def hf_pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first key of an HF PEFT ``rank_pattern`` / ``alpha_pattern`` that selects module ``name``
    (HF PEFT's rule: the key, as a regex, matches a dotted suffix of the name)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def config_from_hf_peft(fields: dict[str, Any], ranks: dict[str, int]) -> "LoRAConfig":
    """The LoRA / DoRA config of an adapter HF PEFT saved, given each adapted module's rank (from its tensors)."""
    if fields.get("peft_type") != "LORA":
        raise CheckpointError(f"HF PEFT adapters of type {fields.get('peft_type')!r} are not supported; LoRA and DoRA are")
    odd = {k: fields[k] for k, default in HF_UNSUPPORTED.items() if fields.get(k, default) not in (default, [], {})}
    if odd:
        raise CheckpointError(f"HF PEFT LoRA options {odd} are not supported here")
    if not ranks:
        raise CheckpointError("the HF PEFT adapter holds no lora_A / lora_B tensors")
    rank_pattern, alpha_pattern = fields.get("rank_pattern") or {}, fields.get("alpha_pattern") or {}
    r, lora_alpha = int(fields.get("r", 8)), float(fields.get("lora_alpha", 8))
    for name, rank in ranks.items():
        key = hf_pattern_key(rank_pattern, name)
        want = int(rank_pattern[key]) if key is not None else r
        if want != rank:
            raise CheckpointError(f"{name}: rank {want} in the HF PEFT config, rank {rank} in its tensors")
    alphas = {}
    for name in ranks:
        key = hf_pattern_key(alpha_pattern, name)
        alphas[name] = float(alpha_pattern[key]) if key is not None else lora_alpha
    cls = LORA_VARIANTS["dora"][0] if fields.get("use_dora") else LoRAConfig
    return cls(rank=r, alpha=lora_alpha, max_share=None, dropout=float(fields.get("lora_dropout") or 0.0),
               use_rslora=bool(fields.get("use_rslora", False)), rank_pattern=dict(ranks), alpha_pattern=alphas)


def _refuse_grouped(name: str, module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"a grouped conv (groups={module.groups}) has no single k x k kernel per channel pair; LoRA skips it"
    return None


def _layer_dims(module: nn.Module) -> tuple[int, int, int]:
    """``(c_in, c_out, kernel elements)``."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels, module.kernel_size[0] * module.kernel_size[1]
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, 1
    raise ConfigError(f"LoRA supports Conv2d and Linear layers, not {type(module).__name__}")


def adapter_share(module: nn.Module, r: int) -> float:
    c_in, c_out, kk = _layer_dims(module)
    return r * (c_in * kk + c_out) / (c_in * c_out * kk)


def weight_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel's weights (DoRA's column norm), computed as HF PEFT does."""
    if weight.dim() > 2:
        return weight.norm(p=2, dim=tuple(range(1, weight.dim())))
    return torch.linalg.norm(weight, dim=1)


#: ``use_dora``-style variants by name: (config class, variant class), filled in by the variant's own module
#: (``dora.py`` registers ``"dora"``), so that this core module never imports its variants.
LORA_VARIANTS: dict[str, tuple[type, type]] = {}


def register_lora_variant(name: str, config_class: type, variant_class: type) -> None:
    """Make ``use_<name>=True`` on a LoRA config select ``variant_class`` (and ``config_class`` when reloading)."""
    LORA_VARIANTS[name] = (config_class, variant_class)


class LoraVariant:
    """How one adapter differs from plain LoRA (HF PEFT's ``LoraVariant``); one instance per adapter.

    ``forward`` receives the base layer's output (bias included) before any plain
    LoRA adapter is added, and returns it with the variant's adapter applied.
    """

    #: the variant's name (``dora``)
    name: str = ""
    #: at most this many adapters of the variant may be active in one layer (None: no limit)
    max_active: int | None = None

    def init(self, layer: "LoRALayer", name: str) -> None:
        """Create the variant's tensors (after ``lora_A`` / ``lora_B`` exist)."""

    def forward(self, layer: "LoRALayer", name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, layer: "LoRALayer", name: str, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def unmerge(self, layer: "LoRALayer", name: str, weight: torch.Tensor) -> None:
        raise NotImplementedError


class LoRALayer(BaseTunerLayer):
    """LoRA on a Conv2d or Linear; adapters may carry a :class:`LoraVariant` (DoRA)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    other_param_names = ("lora_dropout", "r", "lora_alpha", "scaling", "lora_variant")
    target_kinds = (nn.Conv2d, nn.Linear)
    base_layer: nn.Conv2d | nn.Linear

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
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's magnitudes, by adapter
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_variant: dict[str, LoraVariant] = {}

    refuse = staticmethod(_refuse_grouped)

    @staticmethod
    def resolve_lora_variant(config: LoRAConfig) -> LoraVariant | None:
        """The variant an adapter with ``config`` needs (None: plain LoRA)."""
        if config.use_dora:
            return LORA_VARIANTS["dora"][1]()
        return None

    def use_dora(self, name: str) -> bool:
        return getattr(self.lora_variant.get(name), "name", None) == "dora"

    # ------------------------------------------------------------------ weights
    def base_weight(self) -> torch.Tensor:
        """The base weight in float."""
        return self.base_layer.weight

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output."""
        return self.base_layer(x)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.base_layer, nn.Conv2d):
            return self.base_layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    def update_layer(self, adapter_name: str, config: LoRAConfig, r: int, alpha: float) -> None:
        """Add adapter ``adapter_name`` with rank ``r`` and scale numerator ``alpha``."""
        self.add_lora(adapter_name, r, alpha, config.dropout, config.use_rslora, self.resolve_lora_variant(config))

    def add_lora(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 variant: LoraVariant | None = None) -> None:
        if self.merged:
            raise ConfigError("cannot add an adapter while others are merged; call unmerge_lora first")
        base = self.base_layer
        weight = self.base_weight()
        device, dtype = weight.device, weight.dtype if weight.is_floating_point() else torch.float32
        a: nn.Conv2d | nn.Linear
        b: nn.Conv2d | nn.Linear
        if isinstance(base, nn.Conv2d):
            # torch types a Conv2d's kernel_size / stride / padding / dilation as tuple[int, ...]; they are pairs
            a = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,  # type: ignore[arg-type]
                          bias=False, padding_mode=base.padding_mode, device=device, dtype=dtype)
            b = nn.Conv2d(r, base.out_channels, 1, bias=False, device=device, dtype=dtype)
        else:
            a = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
            b = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name] = int(r)
        self.lora_alpha[name] = float(alpha)
        self.scaling[name] = float(alpha) / (math.sqrt(r) if use_rslora else r)
        if variant is not None:
            self.lora_variant[name] = variant
            variant.init(self, name)

    def lora_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights of adapter ``name``'s ``A`` and ``B`` convs / linears."""
        a, b = self.lora_A[name], self.lora_B[name]
        assert isinstance(a, (nn.Conv2d, nn.Linear)) and isinstance(b, (nn.Conv2d, nn.Linear))  # what add_lora made
        return a.weight, b.weight

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """``s * (B (x) A)`` shaped like the base weight (a k x k kernel for convs)."""
        a, b = self.lora_weights(name)
        if self.is_conv:
            delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
        else:
            delta = b @ a
        return delta * self.scaling[name]

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``s * B(A(dropout(x)))``."""
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]

    def channel_view(self, t: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast against this layer's output."""
        return t.view(1, -1, 1, 1) if self.is_conv else t

    def describe(self, name: str) -> dict[str, Any]:
        return {"rank": self.r[name], "alpha": self.lora_alpha[name], "use_dora": self.use_dora(name)}

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = super().file_tensors(name)
        if "lora_magnitude_vector" in out and self.is_conv:  # HF PEFT stores a conv's magnitude as (1, c_out, 1, 1)
            out["lora_magnitude_vector"] = out["lora_magnitude_vector"].view(1, -1, 1, 1)
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not active:
            return self.base_forward(x)
        varied = [a for a in active if a in self.lora_variant]
        for kind in {type(self.lora_variant[a]) for a in varied}:
            same = [a for a in varied if type(self.lora_variant[a]) is kind]
            if kind.max_active is not None and len(same) > kind.max_active:
                raise ConfigError(f"only {kind.max_active} {kind.__name__} adapter(s) can be active at a time, got {same}")
        if not varied and self.can_compose(active):
            return self.composed_forward(x, active)
        result = self.base_forward(x)
        for name in varied:  # variants first, as merge does
            result = self.lora_variant[name].forward(self, name, x, result)
        for name in active:
            if name not in self.lora_variant:
                result = result + self.lora_output(name, x).to(result.dtype)
        return result

    def can_compose(self, names: Sequence[str]) -> bool:
        """Whether the forward of plain-LoRA adapters ``names`` runs as :meth:`composed_forward`: a conv
        training (train mode, autograd on) with no dropout on the adapter input.

        Eval and no-grad forwards keep the adapter convs: same result to float rounding, but a model's
        eval outputs can amplify rounding (BatchNorm channels of tiny variance), and there they should
        match HF PEFT's, which runs the adapter convs; inference merges the adapters anyway.
        """
        return (self.is_conv and self.training and torch.is_grad_enabled()
                and not any(isinstance(self.lora_dropout[n], nn.Dropout) for n in names))

    def composed_forward(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """``conv(x, W + sum s * (B (x) A)) + b``: the base conv and plain-LoRA adapters ``names`` as one conv.

        The same as ``base(x) + sum s * B(A(x))`` (a conv is linear in its weight; ``A`` has the base
        conv's stride / padding / dilation and ``B`` is 1 x 1), but one convolution instead of three
        per adapter, run twice under gradient checkpointing. ``A`` and ``B`` get their gradients
        through the composed kernel; the frozen base weight gets none.
        """
        return self._apply_weight(x, self.composed_weight(names), self.base_layer.bias)

    def composed_weight(self, names: Sequence[str]) -> torch.Tensor:
        """``W + sum s * (B (x) A)`` for conv adapters ``names``: one ``addmm`` per adapter on the kernels
        flattened in their memory order (``(c_out, k, k, c_in)`` for channels-last weights, as the recipe trains on
        the CPU), so that no kernel is copied into another layout and no separate scale or add runs."""
        weight = self.base_weight()
        order = (0, 2, 3, 1) if weight.is_contiguous(memory_format=torch.channels_last) else (0, 1, 2, 3)
        kernel = weight.permute(order)
        out = kernel.reshape(kernel.shape[0], -1)  # a view when the weight is dense in that order
        for name in names:
            a, b = self.lora_weights(name)
            a = a.to(weight.dtype).permute(order)
            out = torch.addmm(out, b.to(weight.dtype).flatten(1), a.reshape(a.shape[0], -1), alpha=self.scaling[name])
        inverse = tuple(order.index(i) for i in range(4))
        return out.view(kernel.shape).permute(inverse)

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight; variant ones first."""
        names = [n for n in (self.active_adapters if names is None else names) if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return
        w = self.base_layer.weight
        for name in sorted(names, key=lambda n: n not in self.lora_variant):
            if name in self.lora_variant:
                self.lora_variant[name].merge(self, name, w)
            else:
                w.add_(self.get_delta_weight(name).to(w.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Exact inverse of :meth:`merge` (to float rounding)."""
        if not self.merged_adapters:
            return
        w = self.base_layer.weight
        for name in reversed(self.merged_adapters):
            if name in self.lora_variant:
                self.lora_variant[name].unmerge(self, name, w)
            else:
                w.sub_(self.get_delta_weight(name).to(w.dtype))
        self.merged_adapters = []


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


def apply_lora(module: nn.Module, config: LoRAConfig | None = None, adapter_name: str = "default", **settings) -> nn.Module:
    """Add a LoRA adapter to ``module`` (a DetectionModel, one of its parts, or any nn.Module).

    Example:
        >>> apply_lora(model.backbone, rank=8)
        >>> apply_lora(model, LoRAConfig(rank=16, alpha=32, targets=["backbone", "neck"]), adapter_name="kitchen")

    Afterwards only adapter parameters (and the class branch if asked) require grad.
    Returns ``module``.
    """
    config = build_config(LoRAConfig, config, settings)
    inject_adapter(module, config, adapter_name, LoRALayer)
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
    fast: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (fast if id(p) in b_ids else rest).append(p)
    if not fast and not rest:
        raise ConfigError("no parameter requires grad; apply a PEFT method first")
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if fast:
        groups.append({"params": fast, "lr": lr * ratio, "weight_decay": weight_decay})
    return groups


register_peft_method(LoRAConfig, LoRALayer, apply=apply_lora)
