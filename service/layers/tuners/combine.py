"""New adapters from old ones: weighted combination (linear / TIES / DARE) and magnitude pruning.

``linear`` is exact: the sum of ``w_i * dW_i`` is written as one LoRA whose rank
is the sum of the ranks (the ``A`` matrices stacked, the ``B`` matrices scaled
and placed side by side). ``ties`` (Yadav et al., 2023: trim each update to its
largest ``density`` fraction, elect a sign per weight from the weighted sum,
average the entries that agree) and ``dare`` (Yu et al., 2024: drop entries with
probability ``1 - density``, rescale the rest by ``1 / density``, then sum) give
a dense update that is factorised back into a LoRA by truncated SVD of rank
``rank`` (default: the sum of the ranks, capped at the layer's full rank, which
is exact).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from models.errors import ConfigError
from service.layers.tuners.base import canonical_name, check_new_adapter_name, iter_tuner_layers, peft_state, refresh_trainable, root_model
from service.layers.tuners.lora import LoRALayer
from service.layers.tuners.model import check_adapter_names

COMBINE_METHODS = ("linear", "ties", "dare")


def _ties(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    trimmed = []
    for d in deltas:
        k = max(1, int(round(density * d.numel())))
        threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values if k < d.numel() else d.abs().min()
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(dim=0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(dim=0) / agree.sum(dim=0).clamp_min(1)


def _dare(deltas: list[torch.Tensor], density: float, generator: torch.Generator) -> torch.Tensor:
    out = torch.zeros_like(deltas[0])
    for d in deltas:
        keep = torch.rand(d.shape, generator=generator) < density
        out += torch.where(keep.to(d.device), d / density, torch.zeros_like(d))
    return out


def combine_adapters(
    model: nn.Module,
    weights: Mapping[str, float],
    method: str = "linear",
    name: str = "combined",
    density: float = 0.5,
    rank: int | None = None,
    seed: int = 0,
) -> str:
    """Create adapter ``name`` from LoRA adapters ``{name: weight}`` and make it the active one.

    Example:
        >>> combine_adapters(model, {"kitchen": 0.5, "shelf": 0.5}, method="ties", name="both")
    """
    root, _ = root_model(model)
    if method not in COMBINE_METHODS:
        raise ConfigError(f"unknown combine method {method!r}; use one of {', '.join(COMBINE_METHODS)}")
    if not weights:
        raise ConfigError("combine_adapters needs at least one {adapter: weight}")
    check_adapter_names(root, list(weights))
    check_new_adapter_name(root, name)
    if not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    generator = torch.Generator().manual_seed(seed)
    rank_pattern: dict[str, int] = {}
    for lname, layer in iter_tuner_layers(root):
        if not isinstance(layer, LoRALayer):
            continue
        sources = [a for a in weights if a in layer.adapter_names]
        if not sources:
            continue
        if any(a in layer.lora_variant for a in sources):
            raise ConfigError(f"{lname}: DoRA adapters have a magnitude vector and cannot be combined; combine LoRA adapters")
        if layer.merged:
            raise ConfigError("unmerge_lora before combining adapters")
        with torch.no_grad():
            if method == "linear":
                a_new = torch.cat([layer.lora_weights(a)[0] for a in sources], dim=0)
                b_new = torch.cat([layer.lora_weights(a)[1] * (weights[a] * layer.scaling[a]) for a in sources], dim=1)
                if rank is not None and rank < a_new.shape[0]:
                    a_new, b_new = _factorise(_delta(layer, a_new, b_new), rank, layer)
            else:
                deltas = [layer.get_delta_weight(a).float() * weights[a] for a in sources]
                dense = _ties(deltas, density) if method == "ties" else _dare(deltas, density, generator)
                target_rank = rank or sum(layer.r[a] for a in sources)
                a_new, b_new = _factorise(dense, target_rank, layer)
        r = a_new.shape[0]
        layer.add_lora(name, r, float(r))
        with torch.no_grad():
            a_weight, b_weight = layer.lora_weights(name)
            a_weight.copy_(a_new)
            b_weight.copy_(b_new)
        rank_pattern[lname] = r
    if not rank_pattern:
        raise ConfigError(f"none of {list(weights)} is a LoRA adapter held by a LoRA layer")
    adapters = peft_state(root).adapters
    first = adapters[next(iter(weights))]
    adapters[name] = {
        **first,
        "peft_type": "qlora" if first.get("peft_type") == "qlora" else "lora",
        "alpha": None,
        "use_rslora": False,
        "use_dora": False,
        "dropout": 0.0,
        "rank_pattern": {canonical_name(k): v for k, v in rank_pattern.items()},
        "alpha_pattern": {canonical_name(k): float(v) for k, v in rank_pattern.items()},
        "combined_from": {"adapters": dict(weights), "method": method, "density": density},
    }
    for _, layer in iter_tuner_layers(root):
        layer.set_adapter([name])
    refresh_trainable(root)
    return name


def _delta(layer: LoRALayer, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if layer.is_conv:
        return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
    return b @ a


def _factorise(dense: torch.Tensor, rank: int, layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` shaped like LoRA weights with ``B A`` the best rank-``rank`` approximation of ``dense``."""
    matrix = dense.reshape(dense.shape[0], -1).float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = max(1, min(rank, s.numel()))
    root_s = s[:r].sqrt()
    b = u[:, :r] * root_s
    a = root_s.unsqueeze(1) * vh[:r]
    if layer.is_conv:
        return a.view(r, *dense.shape[1:]), b.view(dense.shape[0], r, 1, 1)
    return a, b


def prune_adapter(model: nn.Module, sparsity: float = 0.5, adapter_name: str | None = None) -> dict[str, int]:
    """Zero the smallest-magnitude ``sparsity`` fraction of each adapter weight tensor (LoRA A / B, adapter convs).

    ``adapter_name=None`` prunes every active adapter. Returns ``{"zeroed": n, "total": n}``.

    Example:
        >>> prune_adapter(model, sparsity=0.5)
    """
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")
    root, _ = root_model(model)
    if adapter_name is not None:
        check_adapter_names(root, [adapter_name])
    zeroed = total = 0
    with torch.no_grad():
        for _, layer in iter_tuner_layers(root):
            if layer.merged:
                raise ConfigError("unmerge_lora before pruning adapters")
            names = [adapter_name] if adapter_name is not None else layer.active_adapters
            for a in names:
                if a not in layer.adapter_names:
                    continue
                for pname, p in layer.adapter_parameters(a):
                    if pname.startswith("lora_magnitude") or p.dim() < 2:
                        continue
                    k = int(sparsity * p.numel())
                    total += p.numel()
                    if k == 0:
                        continue
                    threshold = p.abs().flatten().kthvalue(k).values
                    mask = p.abs() <= threshold
                    # ties at the threshold may exceed k; keep exactly k zeros
                    idx = torch.nonzero(mask.flatten()).flatten()[:k]
                    flat = p.view(-1)
                    flat[idx] = 0
                    zeroed += int(idx.numel())
    return {"zeroed": zeroed, "total": total}
