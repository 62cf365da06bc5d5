"""Adapter files, as in the wider PEFT ecosystem: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are canonical names (the names in the plain model, without adapter
names): ``model.3.conv.lora_A.weight``, ``model.16.adapter_up.bias``, BitFit and
class-branch parameters under their own names, and, when BatchNorm statistics
were allowed to change (``bn_stats="update"``), every BatchNorm's running mean /
variance / batch count. The config records the base model's fingerprint; a file
saved for another architecture, with other ranks or with missing / extra tensors
is refused with a CheckpointError.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.errors import CheckpointError, ConfigError
from models.io import atomic_write_bytes, atomic_write_json
from service.layers.tuners.base import (
    UnknownAdapterError,
    canonical_name,
    iter_tuner_layers,
    peft_state,
    refresh_trainable,
    root_model,
    set_bn_stats,
)
from service.layers.tuners.registry import get_peft_method

ADAPTER_FORMAT = "glasses-vision/adapter"
ADAPTER_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def base_fingerprint(root: nn.Module) -> dict[str, Any]:
    """What an adapter file must match: the architecture (class count excluded) or, for other modules, the layer shapes."""
    yaml = getattr(root, "yaml", None)
    if isinstance(yaml, dict):
        arch = {k: v for k, v in yaml.items() if k not in ("nc", "yaml_file", "ch", "channels")}
        digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()
        return {"class": type(root).__name__, "arch_name": getattr(root, "arch_name", None), "architecture_sha256": digest}
    shapes = sorted((n, list(s)) for n, s in base_shapes(root).items())
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()
    return {"class": type(root).__name__, "arch_name": None, "architecture_sha256": digest}


def base_shapes(root: nn.Module) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every base parameter (NF4 weights by their original shape)."""
    adapter_ids = {id(p) for _, layer in iter_tuner_layers(root) for a in layer.adapter_names for _, p in layer.adapter_parameters(a)}
    out = {canonical_name(n): tuple(p.shape) for n, p in root.named_parameters() if id(p) not in adapter_ids}
    for name, layer in iter_tuner_layers(root):
        for pname, shape, _, _ in layer.stored_base_tensors():
            out[f"{canonical_name(name)}.{pname}"] = tuple(shape)
    return out


def _bn_buffers(root: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in root.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                out[canonical_name(f"{name}.{b}")] = getattr(m, b)
    return out


def _adapter_tensors(root: nn.Module, adapter: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    for lname, layer in iter_tuner_layers(root):
        if adapter not in layer.adapter_names:
            continue
        cn = canonical_name(lname)
        for pname, p in layer.adapter_parameters(adapter):
            tensors[f"{cn}.{pname}"] = p
        modules[cn] = {"layer": type(layer).__name__, **layer.describe(adapter)}
    return tensors, modules


def _trainable_tensors(root: nn.Module) -> dict[str, torch.Tensor]:
    trainable = peft_state(root).trainable
    return {canonical_name(n): p for n, p in root.named_parameters() if canonical_name(n) in trainable}


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None) -> Path:
    """Write one adapter (default: the active one) plus trained base parameters and BatchNorm statistics.

    Example:
        >>> save_adapter(model, "out/kitchen")
    """
    from safetensors.torch import save as st_save

    root, _ = root_model(model)
    state = peft_state(root)
    peft_config, trainable = state.adapters, state.trainable
    if adapter_name is None:
        active = [a for a in peft_config if any(a in layer.active_adapters for _, layer in iter_tuner_layers(root))]
        if len(active) > 1:
            raise ConfigError(f"several adapters are active ({', '.join(active)}); pass adapter_name")
        adapter_name = active[0] if active else None
    elif adapter_name not in peft_config:
        raise UnknownAdapterError(f"unknown adapter {adapter_name!r}; this model holds: {', '.join(peft_config) or 'no adapters'}")
    if adapter_name is None and not trainable:
        raise ConfigError("nothing to save: the model has no adapter and no PEFT-trained parameter (apply a method first)")
    if any(layer.merged for _, layer in iter_tuner_layers(root)):
        raise ConfigError("adapters are merged into the weights; unmerge_lora before save_adapter")
    tensors, modules = _adapter_tensors(root, adapter_name) if adapter_name else ({}, {})
    tensors.update(_trainable_tensors(root))
    bn_mode = state.bn_stats
    if bn_mode == "update":
        tensors.update({k: v for k, v in _bn_buffers(root).items() if k not in tensors})
    config = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "adapter_name": adapter_name,
        "peft_type": (peft_config[adapter_name]["peft_type"] if adapter_name else "bitfit"),
        "config": peft_config.get(adapter_name) if adapter_name else None,
        "bitfit": state.methods.get("bitfit"),
        "modules": modules,
        "trainable": dict(trainable),
        "bn_stats": bn_mode,
        "bn_stats_saved": bn_mode == "update",
        "base_model": base_fingerprint(root),
    }
    out = Path(directory)
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(out / WEIGHTS_NAME, st_save(data, metadata={"format": ADAPTER_FORMAT}))
    atomic_write_json(out / CONFIG_NAME, config)
    return out


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file() or not (Path(directory) / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{directory} is not an adapter directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if config.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: format {config.get('format')!r} is not {ADAPTER_FORMAT!r}")
    return config


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None, activate: bool = True) -> str:
    """Load an adapter written by :func:`save_adapter`; returns its name in the model.

    A new name injects the adapter layers first (same modules, ranks, QLoRA
    quantisation); a name the model already holds is filled in place, and its
    ranks must match. Trained base parameters and BatchNorm statistics in the
    file are copied into the model. ``activate`` adds it to the active adapters.

    Example:
        >>> load_adapter(model, "out/kitchen", adapter_name="kitchen"); set_adapter(model, "kitchen")
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root, _ = root_model(model)
    config = read_adapter_config(directory)
    want, have = config.get("base_model") or {}, base_fingerprint(root)
    if want.get("architecture_sha256") != have["architecture_sha256"]:
        raise CheckpointError(
            f"{directory} was saved for another architecture ({want.get('arch_name') or want.get('class')}, "
            f"{str(want.get('architecture_sha256'))[:12]}) than this model ({have['arch_name'] or have['class']}, "
            f"{have['architecture_sha256'][:12]}); load it into the model it was trained on"
        )
    try:
        tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {Path(directory) / WEIGHTS_NAME}: {exc}") from exc
    saved_name = config.get("adapter_name")
    name = adapter_name or saved_name
    peft_config = peft_state(root).adapters
    injected = False
    if saved_name is not None and name not in peft_config:
        _inject(root, config, name)
        injected = True
    try:
        _copy_tensors(root, config, tensors, name if saved_name is not None else None)
    except CheckpointError:
        if injected:
            from service.layers.tuners.model import delete_adapter

            delete_adapter(root, name)
        raise
    state = peft_state(root)
    if config.get("bitfit"):
        state.methods["bitfit"] = config["bitfit"]
    state.trainable.update(config.get("trainable", {}))
    set_bn_stats(root, config.get("bn_stats"))
    if saved_name is not None:
        for _, layer in iter_tuner_layers(root):
            if name in layer.adapter_names and name not in layer.active_adapters and activate:
                layer.active_adapters.append(name)
            elif not activate and name in layer.active_adapters and injected:
                layer.active_adapters.remove(name)
    refresh_trainable(root)
    return name or ""


def _inject(root: nn.Module, config: dict[str, Any], name: str) -> None:
    """Rebuild the adapter's layers from its recorded settings, through its registered method."""
    saved = dict(config.get("config") or {})
    method = get_peft_method(config.get("peft_type") or saved.get("peft_type"))
    if method.config_class is None or not method.named:
        raise CheckpointError(f"method {method.name!r} adds no adapter layers to rebuild")
    settings = method.config_class.from_dict(saved).for_reload()
    method.apply(root, settings, adapter_name=name)
    peft_state(root).adapters[name].update({k: v for k, v in saved.items() if k not in peft_state(root).adapters[name]})


def _copy_tensors(root: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], name: str | None) -> None:
    targets: dict[str, torch.Tensor] = {}
    if name is not None:
        targets.update(_adapter_tensors(root, name)[0])
    canonical_params = {canonical_name(n): p for n, p in root.named_parameters()}
    for key in config.get("trainable", {}):
        if key not in canonical_params:
            raise CheckpointError(f"the adapter trains {key}, which this model does not have")
        targets[key] = canonical_params[key]
    if config.get("bn_stats_saved"):
        targets.update({k: v for k, v in _bn_buffers(root).items() if k not in targets})
    missing = [k for k in targets if k not in tensors]
    unexpected = [k for k in tensors if k not in targets]
    reshaped = [k for k in targets if k in tensors and tuple(tensors[k].shape) != tuple(targets[k].shape)]
    if missing or unexpected or reshaped:
        hint = ""
        rank_keys = [k for k in reshaped if ".lora_A" in k or ".lora_B" in k]
        if rank_keys:
            k = rank_keys[0]
            file_r = tensors[k].shape[0] if ".lora_A" in k else tensors[k].shape[1]
            model_r = targets[k].shape[0] if ".lora_A" in k else targets[k].shape[1]
            hint = f" (rank {file_r} in the file, rank {model_r} in the model's adapter {name!r})"
        raise CheckpointError(
            f"adapter tensors do not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(reshaped)} with other shapes "
            f"(e.g. {reshaped[:3]}){hint}"
        )
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(tensors[k].to(device=t.device, dtype=t.dtype))
