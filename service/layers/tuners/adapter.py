"""Bottleneck adapters (Houlsby et al., 2019) after chosen YOLO blocks.

After block ``i`` with output ``y`` (``C`` channels) the adapter adds
``scale * up(act(down(y)))``, where ``down`` is a 1x1 conv ``C -> C / reduction``
and ``up`` a 1x1 conv back to ``C`` initialised to zero, so a fresh adapter
changes nothing. The adapter sits after the block's activation, so it cannot be
folded into the block's weights: ``merge_lora`` refuses it with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from models.detection import DetectionModel
from models.errors import ConfigError
from service.layers.tuners.base import (
    BaseTunerLayer,
    TunerConfig,
    build_config,
    check_choice,
    check_new_adapter_name,
    finish_apply,
    part_of,
    root_model,
)
from service.layers.tuners.registry import register_peft_method

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


@dataclass
class AdapterConfig(TunerConfig):
    """Settings of bottleneck adapters.

    Attributes:
        reduction: hidden channels = ``max(min_hidden, C // reduction)``.
        after: parts (``backbone`` / ``neck``) or layer indices after whose blocks adapters go;
            blocks without parameters (Upsample, Concat) are skipped.
        min_hidden: smallest bottleneck width.
        activation: ``silu`` / ``relu`` / ``gelu``.
        scale: multiplier of the adapter output.
        train_class_branch: make the head's final class predictors fully trainable.
        bn_stats: ``update`` / ``freeze`` BatchNorm running statistics; ``None`` keeps the current choice.
        hidden_pattern: exact ``{layer name: hidden channels}`` (filled in by apply).
    """

    reduction: int = 16
    after: Sequence[Any] = ("neck",)
    min_hidden: int = 8
    activation: str = "silu"
    scale: float = 1.0
    train_class_branch: bool = False
    bn_stats: str | None = None
    hidden_pattern: dict[str, int] = field(default_factory=dict)
    peft_type = "adapters"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.reduction, int) or self.reduction <= 0:
            raise ConfigError(f"reduction must be a positive integer, got {self.reduction!r}")
        if not isinstance(self.min_hidden, int) or self.min_hidden <= 0:
            raise ConfigError(f"min_hidden must be a positive integer, got {self.min_hidden!r}")
        check_choice(self.activation, tuple(ACTIVATIONS), "activation")
        if isinstance(self.after, (str, int)):
            self.after = [self.after]
        self.after = list(self.after)

    def for_reload(self) -> "AdapterConfig":
        """Adapters after exactly the recorded blocks, with the recorded widths."""
        out = super().for_reload()
        if self.hidden_pattern:
            out.after = [int(k.split(".")[1]) for k in self.hidden_pattern]
        return out


class AdapterLayer(BaseTunerLayer):
    """A YOLO block followed by named bottleneck adapters."""

    adapter_layer_names = ("adapter_down", "adapter_up")
    other_param_names = ("adapter_act", "hidden", "adapter_scale")
    mergeable = False
    wraps_block = True

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        for attr in ("f", "i", "type", "np"):  # what ultralytics' layer loop reads
            if hasattr(base_layer, attr):
                setattr(self, attr, getattr(base_layer, attr))
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.hidden: dict[str, int] = {}
        self.adapter_scale: dict[str, float] = {}

    def update_layer(self, name: str, config: AdapterConfig, channels: int, hidden: int) -> None:
        like = next(self.base_layer.parameters())
        activation, scale = config.activation, config.scale
        up = nn.Conv2d(hidden, channels, 1, device=like.device, dtype=like.dtype)
        for p in up.parameters():  # weight and bias: a fresh adapter adds nothing
            nn.init.zeros_(p)
        self.adapter_down[name] = nn.Conv2d(channels, hidden, 1, device=like.device, dtype=like.dtype)
        self.adapter_up[name] = up
        self.adapter_act[name] = ACTIVATIONS[activation]()
        self.hidden[name] = int(hidden)
        self.adapter_scale[name] = float(scale)

    def forward(self, x):
        y = self.base_layer(x)
        for name in self.active_adapters:
            h = self.adapter_act[name](self.adapter_down[name](y))
            y = y + self.adapter_scale[name] * self.adapter_up[name](h)
        return y

    def describe(self, name: str) -> dict[str, Any]:
        return {"hidden": self.hidden[name]}

    def merge(self, names=None) -> None:
        raise ConfigError(
            f"bottleneck adapters (layer {getattr(self, 'i', '?')}) sit after a nonlinearity and cannot be merged into "
            "weights; delete_adapter them before merging, or keep and save them with save_adapter"
        )

    def unmerge(self) -> None:
        return None


def _output_channels(root: DetectionModel, indices: list[int]) -> dict[int, int]:
    """Output channels of the given YOLO layers, from one small eval forward pass."""
    layers = root.model
    found: dict[int, int] = {}
    hooks = [layers[i].register_forward_hook(lambda m, a, out, i=i: found.__setitem__(i, out.shape[1])) for i in indices]
    was_training = root.training
    param = next(root.parameters())
    size = root.max_stride * 2
    try:
        root.eval()
        with torch.no_grad():
            root(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        root.train(was_training)
    return found


def _holds_adapter(layer: nn.Module, adapter_name: str) -> bool:
    return isinstance(layer, AdapterLayer) and adapter_name in layer.adapter_names


def apply_adapters(module: nn.Module, config: AdapterConfig | None = None, adapter_name: str = "default", **settings) -> nn.Module:
    """Insert bottleneck adapters after the chosen blocks of a DetectionModel.

    Example:
        >>> apply_adapters(model, AdapterConfig(reduction=16, after=["neck"]))
    """
    config = build_config(AdapterConfig, config, settings)
    root, scope = root_model(module)
    if not isinstance(root, DetectionModel):
        raise ConfigError("bottleneck adapters go after YOLO blocks: pass a DetectionModel or one of its parts")
    check_new_adapter_name(root, adapter_name)
    layers = root.model
    head_index = len(layers) - 1
    chosen: list[int] = []
    for target in config.after if config.after else (scope or ["backbone", "neck"]):
        if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
            idx = int(target)
            if not 0 <= idx < head_index:
                raise ConfigError(f"adapter position {idx} must be a layer index in 0..{head_index - 1} (not the head)")
            chosen.append(idx)
        elif target in ("backbone", "neck"):
            start, stop = root.part_bounds[target]
            chosen += [i for i in range(start, stop) if any(True for _ in layers[i].parameters())]
        else:
            raise ConfigError(f"adapters go after 'backbone' or 'neck' blocks or a layer index, got {target!r}")
    chosen = sorted({i for i in chosen if scope is None or part_of(root, f"model.{i}") in scope})
    if not chosen:
        raise ConfigError("no block selected for adapters; use after=['backbone'] / ['neck'] or layer indices")
    need = [i for i in chosen if not _holds_adapter(layers[i], adapter_name)]
    channels = _output_channels(root, need)
    hidden_pattern: dict[str, int] = {}
    for i in need:
        name = f"model.{i}"
        c = channels[i]
        hidden = config.hidden_pattern.get(name, max(config.min_hidden, c // config.reduction))
        layer = layers[i]
        if not isinstance(layer, AdapterLayer):
            layer = AdapterLayer(layer)
            layers[i] = layer
        layer.update_layer(adapter_name, config, c, hidden)
        layer.active_adapters.append(adapter_name)
        hidden_pattern[name] = hidden
    config.hidden_pattern = hidden_pattern
    finish_apply(root, config, adapter_name)
    return module


register_peft_method(AdapterConfig, AdapterLayer, apply=apply_adapters)
