"""``trainable_report``: trainable / total parameters and bytes, per part and per method.

Bytes are computed from the tensors (``numel * element_size``), so they are the
same on every machine; an NF4 base weight counts its original number of
parameters and the bytes it really takes (codes + scales).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from torch import nn

from service.layers.tuners.base import PARTS, canonical_name, iter_tuner_layers, part_of, peft_state, root_model


@dataclass
class Row:
    total: int = 0
    trainable: int = 0
    total_bytes: int = 0
    trainable_bytes: int = 0

    def add(self, numel: int, nbytes: int, trainable: bool) -> None:
        self.total += numel
        self.total_bytes += nbytes
        if trainable:
            self.trainable += numel
            self.trainable_bytes += nbytes

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


@dataclass
class TrainableReport:
    """Parameter counts and bytes; ``by_part`` (backbone / neck / head / other) and ``by_method``."""

    by_part: "OrderedDict[str, Row]" = field(default_factory=OrderedDict)
    by_method: "OrderedDict[str, Row]" = field(default_factory=OrderedDict)
    total: Row = field(default_factory=Row)

    def to_dict(self) -> dict:
        row = lambda r: {"total": r.total, "trainable": r.trainable, "trainable_pct": round(100 * r.share, 4),  # noqa: E731
                         "total_bytes": r.total_bytes, "trainable_bytes": r.trainable_bytes}
        return {"total": row(self.total), "by_part": {k: row(v) for k, v in self.by_part.items()},
                "by_method": {k: row(v) for k, v in self.by_method.items()}}

    def table(self) -> str:
        """Two markdown tables: per part, then per method."""
        lines = ["| part | parameters | trainable | trainable % | bytes | trainable bytes |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in [*self.by_part.items(), ("**total**", self.total)]:
            lines.append(f"| {name} | {r.total:,} | {r.trainable:,} | {100 * r.share:.3f} | {r.total_bytes:,} | {r.trainable_bytes:,} |")
        lines += ["", "| method | parameters | trainable | bytes | trainable bytes |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, r in self.by_method.items():
            lines.append(f"| {name} | {r.total:,} | {r.trainable:,} | {r.total_bytes:,} | {r.trainable_bytes:,} |")
        return "\n".join(lines)

    __str__ = table


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count every parameter of ``model`` by part and by method.

    Example:
        >>> print(trainable_report(model).table())
    """
    root, _ = root_model(model)
    state = peft_state(root)
    trainable = state.trainable
    methods: dict[int, str] = {}
    for _, layer in iter_tuner_layers(root):
        for adapter in layer.adapter_names:
            kind = state.adapters.get(adapter, {}).get("peft_type") or type(layer).__name__
            for _, p in layer.adapter_parameters(adapter):
                methods[id(p)] = f"{kind} ({adapter})"
    report = TrainableReport()
    for part in PARTS:
        if hasattr(root, "part_bounds"):
            report.by_part[part] = Row()

    def count(name: str, numel: int, nbytes: int, on: bool, method: str) -> None:
        report.by_part.setdefault(part_of(root, name), Row()).add(numel, nbytes, on)
        report.by_method.setdefault(method, Row()).add(numel, nbytes, on)
        report.total.add(numel, nbytes, on)

    for name, p in root.named_parameters():
        cn = canonical_name(name)
        method = methods.get(id(p)) or trainable.get(cn) or ("base (trainable)" if p.requires_grad else "base (frozen)")
        count(cn, p.numel(), p.numel() * p.element_size(), p.requires_grad, method)
    for name, layer in iter_tuner_layers(root):
        for pname, shape, nbytes, label in layer.stored_base_tensors():
            count(f"{canonical_name(name)}.{pname}", math.prod(shape), nbytes, False, label)
    return report
