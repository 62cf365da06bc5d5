"""Exact memory accounting for one training step: a budget table of where the bytes go.

Byte counts are computed from tensors (``numel × element_size``), so they are the
same on every machine:

* parameters — trainable (``requires_grad``), frozen, and quantised: integer
  (uint8 / int8) tensors and tensors named like ``*quant*`` / ``*nf4*``, plus
  every other buffer of a module that holds one (its absmax scales), e.g. the NF4
  base weight of a QLoRA layer;
* buffers — the other buffers (BatchNorm running statistics);
* gradients — every ``.grad`` alive after backward (none with optimizer-in-backward);
* optimizer state — every tensor in ``optimizer.state`` (moments, step counters,
  projections, quantisation scales), after the step so lazily created state exists;
* activations — tensors autograd saved for backward during the step, collected with
  ``torch.autograd.graph.saved_tensors_hooks``. A saved tensor is counted once per
  storage (views and repeated saves of one tensor share a storage) and by the whole
  storage's size (a view keeps its storage alive). Storages that belong to parameters
  or buffers are not activations and are left out. The input batch is counted when a
  layer saves it. Activations recomputed by checkpointing or run under ``no_grad``
  are not saved and so not counted — which is the point of those techniques.

On CUDA, ``torch.cuda.max_memory_allocated`` over the step is reported as well.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

QUANT_NAME_HINTS = ("quant", "nf4")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return str(t.device), s.data_ptr()


def _is_quantized(name: str, t: torch.Tensor) -> bool:
    return t.dtype in (torch.uint8, torch.int8) or any(h in name.lower() for h in QUANT_NAME_HINTS)


@dataclass
class MemoryReport:
    """Bytes per component of one training step. ``table()`` renders it, ``to_dict()`` serialises it."""

    params_trainable: int = 0
    params_frozen: int = 0
    params_quantized: int = 0
    buffers: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    cuda_max_allocated: int | None = None
    #: tensors counted per component (for logs)
    counts: dict[str, int] = field(default_factory=dict)

    COMPONENTS = (
        ("params_trainable", "parameters (trainable)"),
        ("params_frozen", "parameters (frozen)"),
        ("params_quantized", "parameters (quantized)"),
        ("buffers", "buffers"),
        ("gradients", "gradients"),
        ("optimizer_state", "optimizer state"),
        ("activations", "activations saved for backward"),
    )

    @property
    def total(self) -> int:
        """Sum of the counted components (not the CUDA peak, which is measured separately)."""
        return sum(getattr(self, key) for key, _ in self.COMPONENTS)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total"] = self.total
        return out

    def table(self) -> str:
        """A memory budget table: component, bytes, MiB, share of the total."""
        total = max(self.total, 1)
        rows = [(label, getattr(self, key)) for key, label in self.COMPONENTS]
        width = max(len(label) for label, _ in rows + [("total", 0)])
        lines = [f"{'component':<{width}}  {'bytes':>14}  {'MiB':>9}  {'share':>6}", "-" * (width + 39)]
        for label, n in rows:
            lines.append(f"{label:<{width}}  {n:>14,}  {n / 2**20:>9.2f}  {100 * n / total:>5.1f}%")
        lines.append("-" * (width + 39))
        lines.append(f"{'total':<{width}}  {self.total:>14,}  {self.total / 2**20:>9.2f}  {100.0:>5.1f}%")
        if self.cuda_max_allocated is not None:
            n = self.cuda_max_allocated
            lines.append(f"{'CUDA max_memory_allocated':<{width}}  {n:>14,}  {n / 2**20:>9.2f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def count_parameters(model: nn.Module, report: MemoryReport) -> set[tuple[str, int]]:
    """Fill the parameter and buffer lines of ``report``; returns the storages they occupy."""
    seen: set[tuple[str, int]] = set()
    quant_modules = {
        id(m)
        for m in model.modules()
        if any(_is_quantized(n, t) for n, t in [*m.named_buffers(recurse=False), *m.named_parameters(recurse=False)])
    }
    for module in model.modules():
        quant_module = id(module) in quant_modules
        for name, p in module.named_parameters(recurse=False):
            key = _storage_key(p)
            if key in seen:
                continue
            seen.add(key)
            if _is_quantized(name, p):
                report.params_quantized += tensor_bytes(p)
            elif p.requires_grad:
                report.params_trainable += tensor_bytes(p)
            else:
                report.params_frozen += tensor_bytes(p)
        for name, b in module.named_buffers(recurse=False):
            key = _storage_key(b)
            if key in seen or b.numel() == 0:
                continue
            seen.add(key)
            if quant_module and (b.is_floating_point() or _is_quantized(name, b)):
                report.params_quantized += tensor_bytes(b)
            else:
                report.buffers += tensor_bytes(b)
    return seen


def count_gradients(model: nn.Module) -> int:
    """Bytes of every ``.grad`` currently held by the model's parameters (each storage once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.grad is not None and _storage_key(p.grad) not in seen:
            seen.add(_storage_key(p.grad))
            total += tensor_bytes(p.grad)
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, step counters, projections, scales)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and _storage_key(value) not in seen:
                seen.add(_storage_key(value))
                total += tensor_bytes(value)
    return total


class SavedTensorCounter:
    """Context manager that records every tensor autograd saves for backward, once per storage."""

    def __init__(self, exclude: set[tuple[str, int]] | None = None):
        self.exclude = exclude or set()
        self.storages: dict[tuple[str, int], int] = {}

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self.exclude and key[1] != 0:
            self.storages[key] = t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> "SavedTensorCounter":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def measure_memory(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step_fn: Callable[[], Any],
    optimizer_step: bool = True,
) -> MemoryReport:
    """Run one training step and account for its memory.

    ``step_fn`` runs forward + backward and returns the loss. Saved activations are
    recorded during it; gradients are counted right after it; then (when
    ``optimizer_step``) ``optimizer.step()`` runs so that lazily created state is
    counted, and the gradients are zeroed. This is a real training step: it changes
    the weights.
    """
    report = MemoryReport()
    param_storages = count_parameters(model, report)
    cuda = torch.cuda.is_available() and any(p.is_cuda for p in model.parameters())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with SavedTensorCounter(exclude=param_storages) as saved:
        step_fn()
    report.activations = saved.nbytes
    report.gradients = count_gradients(model)
    if optimizer is not None:
        if optimizer_step:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        report.optimizer_state = optimizer_state_bytes(optimizer)
    if cuda:
        torch.cuda.synchronize()
        report.cuda_max_allocated = int(torch.cuda.max_memory_allocated())
    report.counts = {"saved_storages": len(saved.storages)}
    return report
