"""Training-state checkpoints: crash-safe, loadable with ``weights_only=True``, exact to resume.

A checkpoint is a directory ``checkpoints/step-00000123/`` holding

* ``model.safetensors`` — the full model state (base weights, adapters, BatchNorm statistics),
* ``train_state.pt`` — optimizer (COAP projections included), scheduler, EMA weights, the RNG states
  (python, numpy, torch, CUDA) of every process, a list indexed by rank (:func:`rng_state_for_rank`); only tensors
  and plain values, so ``torch.load(weights_only=True)`` reads it,
* ``state.json`` — step, epoch, position inside the epoch, best metric, the batch layout (batch, accumulate,
  processes) it was trained with (human readable).

``checkpoints/last`` is a symlink replaced atomically (``os.replace``) once the new
directory is complete and fsynced, and older directories are deleted only after
that; a run killed at any moment (SIGKILL included) leaves ``last`` pointing at a
complete checkpoint. Saving a step that already has a directory replaces it (``last``
points at the complete new copy while the old one is removed).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.errors import CheckpointError
from models.io import atomic_write_bytes, atomic_write_json

LAST = "last"


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors and plain values."""
    numpy_state = np.random.get_state(legacy=True)  # the default, named: numpy's stub types the default as legacy=False
    assert isinstance(numpy_state, tuple)  # a dict only for a bit generator other than MT19937, which np.random is not
    kind, keys, pos, has_gauss, cached = numpy_state
    state = {
        "python": list(_to_plain(random.getstate())),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_state_for_rank(saved: dict[str, Any] | list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
    """The RNG state process ``rank`` of ``world`` resumes with, from a checkpoint's ``train_state["rng"]``.

    A list with one state per process of the same count gives each process its own: the resume draws what the
    uninterrupted run would have. With another process count every process takes rank 0's state
    (:func:`training.recipe.check_resume_batch` has warned that such a resume is not bit for bit). A checkpoint
    written before per-process states holds rank 0's state alone: every process takes it, and a resume on more
    than one process is exact only for rank 0's draws (a warning says so).
    """
    if isinstance(saved, dict):
        if world > 1 and rank == 0:
            warnings.warn("the checkpoint holds the RNG state of rank 0 only (written before every process's state "
                          "was saved): every process resumes with it, so the resume is exact only for rank 0's "
                          "random draws (augmentation on the other processes differs from the uninterrupted run)",
                          stacklevel=2)
        return saved
    return saved[rank] if len(saved) == world else saved[0]


def _to_plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    checkpoint_root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    info: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Write a complete checkpoint for ``step`` and point ``last`` at it; keep the newest ``keep`` directories."""
    from safetensors.torch import save as st_save

    root = Path(checkpoint_root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:08d}"
    staging = root / f".tmp-step-{step:08d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # never one ``last`` is on
    staging.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    atomic_write_bytes(staging / "model.safetensors", st_save(tensors))
    buf = io.BytesIO()
    torch.save(train_state, buf)
    atomic_write_bytes(staging / "train_state.pt", buf.getvalue())
    atomic_write_json(staging / "state.json", {**info, "step": step})
    _fsync_dir(staging)
    if target.exists():  # a crashed earlier attempt at the same step, or a re-save of the step ``last`` is on
        if _resolve_last(root) == target.resolve():
            _point_last(root, staging)  # ``last`` stays on a complete checkpoint while ``target`` is replaced
            staging = _linked_copy(staging)  # renaming the directory ``last`` is on would leave it dangling
        shutil.rmtree(target)
    os.replace(staging, target)
    _point_last(root, target)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.resolve() != target.resolve():
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale_link in root.glob(f".{LAST}.*.tmp"):  # a process killed between symlink and replace in _point_last
        stale_link.unlink(missing_ok=True)
    return target


def _linked_copy(directory: Path) -> Path:
    """A second staging directory of hard links to ``directory``'s (already fsynced) files; on a filesystem
    without hard links (``os.link`` raises OSError) a copy whose files are fsynced before it is used."""
    copy = directory.with_name(f"{directory.name}-linked")
    try:
        shutil.copytree(directory, copy, copy_function=os.link)
    except OSError:  # shutil.Error (one per file that failed) is an OSError too
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(directory, copy, copy_function=_synced_copy)
    _fsync_dir(copy)
    return copy


def _synced_copy(src: str, dst: str) -> str:
    """``shutil.copy2`` whose copy is on disk when it returns (``last`` will point at it)."""
    shutil.copy2(src, dst)
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())
    return dst


def _point_last(root: Path, directory: Path) -> None:
    """Atomically make ``root/last`` a relative symlink to ``directory`` (a child of ``root``)."""
    link_tmp = root / f".{LAST}.{os.getpid()}.tmp"
    link_tmp.unlink(missing_ok=True)
    os.symlink(directory.name, link_tmp)
    os.replace(link_tmp, root / LAST)
    _fsync_dir(root)


def _resolve_last(root: Path) -> Path | None:
    last = root / LAST
    return last.resolve() if last.exists() else None


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run directory, a ``checkpoints`` directory or a checkpoint directory to a checkpoint directory."""
    path = Path(path)
    for candidate in (path / "checkpoints" / LAST, path / LAST, path):
        if (candidate / "train_state.pt").is_file() and (candidate / "model.safetensors").is_file():
            return candidate.resolve()
    raise CheckpointError(
        f"no training checkpoint under {path}: expected {path}/checkpoints/last/ with model.safetensors and train_state.pt"
    )


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The ``state.json`` of the checkpoint ``path`` names (step, epoch, batch layout), without reading the weights."""
    ckpt = find_checkpoint(path)
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} cannot be read: {exc}") from exc


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict, dict]:
    """``(model_state, train_state, info)`` of a checkpoint; ``train_state`` is read with ``weights_only=True``."""
    from safetensors.torch import load_file

    ckpt = find_checkpoint(path)
    try:
        model_state = load_file(str(ckpt / "model.safetensors"), device=str(map_location))
        train_state = torch.load(ckpt / "train_state.pt", map_location=map_location, weights_only=True)
        info = json.loads((ckpt / "state.json").read_text())
    except Exception as exc:
        raise CheckpointError(f"checkpoint {ckpt} cannot be read: {exc}") from exc
    return model_state, train_state, info
