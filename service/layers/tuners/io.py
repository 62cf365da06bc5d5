"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, in HF PEFT's layout.

A LoRA-family adapter (LoRA, rsLoRA, DoRA, QLoRA) is written so that
``peft.PeftModel.from_pretrained(model, directory)`` loads it on the same
architecture: the config carries HF PEFT's ``LoraConfig`` fields
(``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``, exact
``rank_pattern`` / ``alpha_pattern``, ``use_rslora``, ``use_dora``,
``modules_to_save``, ``base_model_name_or_path``) and tensor keys are HF PEFT's
(``base_model.model.<module>.lora_A.weight``, ``...lora_magnitude_vector``).
Base modules whose tensors the adapter carries (every BatchNorm when its
statistics were updated, the class branch, BitFit biases) are listed in
``modules_to_save`` and stored whole under their own names; a trained bias of a
LoRA-wrapped layer is stored as ``<module>.base_layer.bias``.

What HF PEFT has no field for goes under ``"glasses_vision"`` (HF PEFT ignores it,
with a warning about unexpected keys): the method and its full settings, per-module
ranks, which base parameters train, the BatchNorm choice and a fingerprint of the
base architecture. Methods HF PEFT does not have (bottleneck adapters, BitFit alone,
registered methods) use the same layout with ``peft_type`` set to their own name.

``load_adapter`` also reads adapters HF PEFT saved (LoRA / DoRA) and files in this
library's first format (canonical keys, everything under ``config``), converting
them on read. A file saved for another architecture, with other ranks or with
missing / extra tensors is refused with a CheckpointError.
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
    UnknownMethodError,
    canonical_name,
    is_peft_layer,
    iter_tuner_layers,
    peft_state,
    refresh_trainable,
    root_model,
    set_bn_stats,
)
from service.layers.tuners.lora import config_from_hf_peft
from service.layers.tuners.registry import get_peft_method

ADAPTER_FORMAT = "glasses-vision/adapter"
ADAPTER_VERSION = 2
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: the key of this library's own settings in adapter_config.json
EXTRA_FIELD = "glasses_vision"
#: HF PEFT's prefix of every tensor key (PeftModel.base_model.model)
KEY_PREFIX = "base_model.model."
_BN_STATS = ("running_mean", "running_var")


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


def _plain_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Canonical module name -> the plain module (a wrapper stands for nothing; its base layer for itself)."""
    return {canonical_name(n): m for n, m in root.named_modules() if not is_peft_layer(m)}


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's own parameters and persistent buffers (not its children's)."""
    out: dict[str, torch.Tensor] = {k: p for k, p in module._parameters.items() if p is not None}
    out.update({k: b for k, b in module._buffers.items() if b is not None and k not in module._non_persistent_buffers_set})
    return out


def _base_tensors(root: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical name -> every base parameter and persistent buffer a file may carry."""
    adapter_ids = {id(p) for _, layer in iter_tuner_layers(root) for a in layer.adapter_names for _, p in layer.adapter_parameters(a)}
    out = {}
    for mname, module in _plain_modules(root).items():
        for k, t in _own_tensors(module).items():
            if id(t) not in adapter_ids:
                out[f"{mname}.{k}" if mname else k] = t
    return out


def _bn_modules(root: nn.Module) -> list[str]:
    return [n for n, m in _plain_modules(root).items()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


# ---------------------------------------------------------------------------- save
def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None) -> Path:
    """Write one adapter (default: the active one) plus trained base parameters and BatchNorm statistics.

    Example:
        >>> save_adapter(model, "out/kitchen")   # then also: PeftModel.from_pretrained(base, "out/kitchen")
    """
    from safetensors.torch import save as st_save

    root, _ = root_model(model)
    state = peft_state(root)
    if adapter_name is None:
        active = [a for a in state.adapters if any(a in layer.active_adapters for _, layer in iter_tuner_layers(root))]
        if len(active) > 1:
            raise ConfigError(f"several adapters are active ({', '.join(active)}); pass adapter_name")
        adapter_name = active[0] if active else None
    elif adapter_name not in state.adapters:
        raise UnknownAdapterError(f"unknown adapter {adapter_name!r}; this model holds: {', '.join(state.adapters) or 'no adapters'}")
    if adapter_name is None and not state.trainable:
        raise ConfigError("nothing to save: the model has no adapter and no PEFT-trained parameter (apply a method first)")
    if any(layer.merged for _, layer in iter_tuner_layers(root)):
        raise ConfigError("adapters are merged into the weights; unmerge_lora before save_adapter")

    settings = state.adapters.get(adapter_name) if adapter_name else None
    method = get_peft_method(settings["peft_type"]) if settings else None
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for lname, layer in iter_tuner_layers(root):
        if adapter_name in layer.adapter_names:
            cn = canonical_name(lname)
            modules[cn] = {"layer": type(layer).__name__, **layer.describe(adapter_name)}
            tensors.update({f"{cn}.{k}": t for k, t in layer.file_tensors(adapter_name).items()})
    plain, base = _plain_modules(root), _base_tensors(root)
    to_save: set[str] = set()
    for pname in state.trainable:
        owner, _, local = pname.rpartition(".")
        if owner in modules:  # a trained base tensor of a wrapped layer: HF PEFT's name for it
            tensors[f"{owner}.base_layer.{local}"] = base[pname]
        else:
            to_save.add(owner)
    bn_saved = state.bn_stats == "update"
    if bn_saved:
        to_save.update(_bn_modules(root))
    for owner in to_save:
        tensors.update({f"{owner}.{k}": t for k, t in _own_tensors(plain[owner]).items()})

    fingerprint = base_fingerprint(root)
    extra = {
        "format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "method": method.name if method else None,
        "adapter_name": adapter_name, "config": settings, "modules": modules, "trainable": dict(state.trainable),
        "methods": dict(state.methods), "bn_stats": state.bn_stats, "bn_stats_saved": bn_saved, "base_model": fingerprint,
    }
    hf_fields = getattr(method.config_class, "hf_peft_fields", None) if method else None
    if hf_fields is not None:
        config: dict[str, Any] = hf_fields(settings, modules)
    else:
        config = {"peft_type": (method.name if method else "+".join(state.methods) or "trainable").upper()}
    config.update({"base_model_name_or_path": fingerprint.get("arch_name"),
                   "modules_to_save": sorted(to_save) or None, EXTRA_FIELD: extra})
    out = Path(directory)
    data = {KEY_PREFIX + k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(out / WEIGHTS_NAME, st_save(data, metadata={"format": "pt"}))
    atomic_write_json(out / CONFIG_NAME, config)
    return out


# ---------------------------------------------------------------------------- read
def _file_key(key: str) -> str:
    """A file's tensor key as a canonical name (HF PEFT prefix and ``base_layer`` dropped; first-format names updated)."""
    key = canonical_name(key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key)
    return key + "_vector" if key.endswith(".lora_magnitude") else key


def _tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(directory / WEIGHTS_NAME), "pt") as f:
            return {_file_key(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {directory / WEIGHTS_NAME}: {exc}") from exc


def _from_hf_peft(raw: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The description of an adapter HF PEFT saved (no glasses_vision field)."""
    ranks = {k[: -len(".lora_A.weight")]: shape[0] for k, shape in shapes.items() if k.endswith(".lora_A.weight")}
    config = config_from_hf_peft(raw, ranks)
    lora_keys = (".lora_A.", ".lora_B.", ".lora_magnitude_vector")
    base_keys = [k for k in shapes if not any(s in k for s in lora_keys)]
    params = [k for k in base_keys if k.rpartition(".")[2] not in (*_BN_STATS, "num_batches_tracked")]
    return {
        "source": "hf-peft", "method": config.peft_type, "adapter_name": None, "config": config.to_dict(),
        "modules": {n: {"rank": r, "alpha": config.alpha_pattern[n], "use_dora": config.use_dora} for n, r in ranks.items()},
        "trainable": {k: "modules_to_save" for k in params}, "methods": {},
        # BatchNorm statistics come only for the modules_to_save BatchNorms: copied, not required of every BatchNorm
        "bn_stats": "update", "bn_stats_saved": False, "base_model": None,
    }


def _from_first_format(raw: dict[str, Any]) -> dict[str, Any]:
    """The description of an adapter in this library's first format (version 1)."""
    method = raw.get("peft_type") if raw.get("adapter_name") is not None else None
    config = dict(raw.get("config") or {}) or None
    modules = raw.get("modules") or {}
    if config is not None and any("rank" in m for m in modules.values()):
        config["rank_pattern"] = {k: m["rank"] for k, m in modules.items()}
        config["alpha_pattern"] = {k: m["alpha"] for k, m in modules.items()}
    return {
        "source": f"{ADAPTER_FORMAT} v1", "method": method, "adapter_name": raw.get("adapter_name"), "config": config,
        "modules": modules, "trainable": dict(raw.get("trainable") or {}),
        "methods": {"bitfit": raw["bitfit"]} if raw.get("bitfit") else {},
        "bn_stats": raw.get("bn_stats") or "update", "bn_stats_saved": bool(raw.get("bn_stats_saved")),
        "base_model": raw.get("base_model"),
    }


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """What an adapter directory holds, the same for every format it may be in.

    Keys: ``source`` (``glasses-vision/adapter v2``, ``... v1`` or ``hf-peft``),
    ``method`` (registered name, or None for base parameters only), ``adapter_name``,
    ``config`` (the method's settings), ``modules`` (per adapted module: rank, alpha, ...),
    ``trainable`` (base parameter -> role), ``methods`` (adapter-less methods' settings),
    ``bn_stats``, ``bn_stats_saved``, ``base_model`` (fingerprint or None), ``hf_peft``
    (the HF PEFT fields, None when the method is not one HF PEFT has).

    Example:
        >>> read_adapter_config("out/kitchen")["modules"]
    """
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{directory} is not an adapter directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds no JSON object")
    extra = raw.get(EXTRA_FIELD)
    if isinstance(extra, dict) and extra.get("format") == ADAPTER_FORMAT:
        desc = {"source": f"{ADAPTER_FORMAT} v{extra.get('version')}",
                **{k: extra.get(k) for k in ("method", "adapter_name", "config", "modules", "trainable", "methods",
                                             "bn_stats", "bn_stats_saved", "base_model")}}
        desc["trainable"], desc["methods"] = desc["trainable"] or {}, desc["methods"] or {}
    elif raw.get("format") == ADAPTER_FORMAT:
        desc = _from_first_format(raw)
    elif raw.get("peft_type") == "LORA":
        desc = _from_hf_peft(raw, _tensor_shapes(directory))
    else:
        raise CheckpointError(f"{path} is neither a glasses-vision adapter nor an HF PEFT LoRA adapter "
                              f"(peft_type {raw.get('peft_type')!r}, format {raw.get('format')!r})")
    desc["peft_type"] = desc["method"] or "bitfit"  # the method's name, as the first format called it
    desc["hf_peft"] = {k: v for k, v in raw.items() if k != EXTRA_FIELD} if raw.get("peft_type") == "LORA" else None
    return desc


# ---------------------------------------------------------------------------- load
def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None, activate: bool = True) -> str:
    """Load an adapter written by :func:`save_adapter` (or a LoRA / DoRA adapter HF PEFT saved); returns its name.

    A new name injects the adapter layers first (same modules, ranks, QLoRA
    quantisation); a name the model already holds is filled in place, and its
    ranks must match. Trained base parameters and BatchNorm statistics in the
    file are copied into the model. ``activate`` adds it to the active adapters.
    An HF PEFT adapter is named ``adapter_name`` or ``default``.

    Example:
        >>> load_adapter(model, "out/kitchen", adapter_name="kitchen"); set_adapter(model, "kitchen")
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root, _ = root_model(model)
    desc = read_adapter_config(directory)
    want, have = desc.get("base_model"), base_fingerprint(root)
    if want and want.get("architecture_sha256") != have["architecture_sha256"]:
        raise CheckpointError(
            f"{directory} was saved for another architecture ({want.get('arch_name') or want.get('class')}, "
            f"{str(want.get('architecture_sha256'))[:12]}) than this model ({have['arch_name'] or have['class']}, "
            f"{have['architecture_sha256'][:12]}); load it into the model it was trained on"
        )
    try:
        tensors = {_file_key(k): v for k, v in load_file(str(Path(directory) / WEIGHTS_NAME)).items()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {Path(directory) / WEIGHTS_NAME}: {exc}") from exc
    method = desc["method"]
    name = (adapter_name or desc["adapter_name"] or "default") if method else None
    state = peft_state(root)
    injected = False
    if name is not None and name not in state.adapters:
        _inject(root, desc, name)
        injected = True
    try:
        _copy_tensors(root, desc, tensors, name)
    except CheckpointError:
        if injected and name is not None:
            from service.layers.tuners.model import delete_adapter

            delete_adapter(root, name)
        raise
    state.methods.update(desc["methods"])
    state.trainable.update(desc["trainable"])
    set_bn_stats(root, desc.get("bn_stats"))
    if method:
        for _, layer in iter_tuner_layers(root):
            if name in layer.adapter_names and name not in layer.active_adapters and activate:
                layer.active_adapters.append(name)
            elif not activate and name in layer.active_adapters and injected:
                layer.active_adapters.remove(name)
    refresh_trainable(root)
    return name or ""


def _inject(root: nn.Module, desc: dict[str, Any], name: str) -> None:
    """Rebuild the adapter's layers from its recorded settings, through its registered method."""
    saved = dict(desc.get("config") or {})
    try:
        method = get_peft_method(desc["method"])
    except UnknownMethodError as exc:
        raise CheckpointError(f"the adapter was made by PEFT method {desc['method']!r}, which is not registered here: {exc}") from exc
    if method.config_class is None or not method.named:
        raise CheckpointError(f"method {method.name!r} adds no adapter layers to rebuild")
    settings = method.config_class.from_dict(saved).for_reload()
    method.apply(root, settings, adapter_name=name)
    recorded = peft_state(root).adapters[name]
    recorded.update({k: v for k, v in saved.items() if k not in recorded})  # e.g. what a combined adapter came from


def _same_shape(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a == b or [s for s in a if s != 1] == [s for s in b if s != 1]


def _copy_tensors(root: nn.Module, desc: dict[str, Any], tensors: dict[str, torch.Tensor], name: str | None) -> None:
    targets: dict[str, torch.Tensor] = {}
    if name is not None:
        for lname, layer in iter_tuner_layers(root):
            if name in layer.adapter_names:
                cn = canonical_name(lname)
                targets.update({f"{cn}.{k}": p for k, p in layer.adapter_parameters(name)})
    base = _base_tensors(root)
    for key in desc.get("trainable", {}):
        if key not in base:
            raise CheckpointError(f"the adapter trains {key}, which this model does not have")
    expected = set(targets) | set(desc.get("trainable", {}))
    if desc.get("bn_stats_saved"):
        expected |= {f"{m}.{b}" for m in _bn_modules(root) for b in _BN_STATS}
    unexpected = [k for k in tensors if k not in targets and k not in base]
    targets.update({k: base[k] for k in tensors if k in base and k not in targets})
    missing = [k for k in expected if k not in tensors]
    reshaped = [k for k in targets if k in tensors and not _same_shape(tuple(tensors[k].shape), tuple(targets[k].shape))]
    if missing or unexpected or reshaped:
        hint = ""
        rank_keys = [k for k in reshaped if ".lora_A." in k or ".lora_B." in k]
        if rank_keys:
            k = rank_keys[0]
            file_r = tensors[k].shape[0] if ".lora_A." in k else tensors[k].shape[1]
            model_r = targets[k].shape[0] if ".lora_A." in k else targets[k].shape[1]
            hint = f" (rank {file_r} in the file, rank {model_r} in the model's adapter {name!r})"
        raise CheckpointError(
            f"adapter tensors do not match the model: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(reshaped)} with other shapes "
            f"(e.g. {reshaped[:3]}){hint}"
        )
    with torch.no_grad():
        for k, t in targets.items():
            if k in tensors:
                t.copy_(tensors[k].reshape(t.shape).to(device=t.device, dtype=t.dtype))
