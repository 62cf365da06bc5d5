"""Training-curve and precision-recall plots (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from models.io import atomic_write_bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_training_curves(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Loss and LR per step, and val mAP per evaluation, from metrics.jsonl records."""
    plt = _figure()
    records = list(records)
    steps = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if steps:
        x = [r["step"] for r in steps]
        axes[0].plot(x, [r["loss"] for r in steps], label="total")
        for key in ("box_loss", "cls_loss", "dfl_loss"):
            if key in steps[0]:
                axes[0].plot(x, [r[key] for r in steps], label=key, alpha=0.7)
        axes[1].plot(x, [r["lr"] for r in steps])
    axes[0].set(title="training loss", xlabel="step")
    axes[0].legend(fontsize=7)
    axes[1].set(title="learning rate", xlabel="step")
    if evals:
        x = [r["step"] for r in evals]
        axes[2].plot(x, [r["map50"] for r in evals], "o-", label="mAP50")
        axes[2].plot(x, [r["map50_95"] for r in evals], "o-", label="mAP50-95")
        axes[2].legend(fontsize=7)
    axes[2].set(title="val mAP", xlabel="step", ylim=(0, 1))
    return _save(fig, Path(path))


def plot_pr_curve(
    recall: np.ndarray, precision: np.ndarray, ap50: Sequence[float], names: Sequence[str], path: str | Path
) -> Path:
    """Precision-recall curves at IoU 0.5 per class (``precision`` is classes x len(recall)) and their mean."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 5))
    precision = np.atleast_2d(precision)
    for row, ap, name in zip(precision, ap50, names):
        ax.plot(recall, row, linewidth=1, label=f"{name} {ap:.3f}")
    if len(precision):
        ax.plot(recall, precision.mean(0), linewidth=3, color="blue", label=f"all classes {np.mean(ap50):.3f} mAP@0.5")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1), title="precision-recall (IoU 0.5)")
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, Path(path))
