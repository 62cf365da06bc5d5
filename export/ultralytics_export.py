"""Back to ultralytics: a tuned model as a checkpoint ``ultralytics.YOLO("tuned.pt")`` loads.

    >>> from export.ultralytics_export import export_ultralytics
    >>> report = export_ultralytics("runs/kitchen", "tuned.pt")        # adapters merged, weights checked
    >>> from ultralytics import YOLO
    >>> YOLO("tuned.pt").predict("frame.jpg", iou=0.45)               # same boxes as export.runtime

The file is a **pickle**, as every ultralytics checkpoint is: loading it runs code
from it, so hand it only to people who trust you. The project's own formats stay
pickle-free (model directories are safetensors + JSON, exports are ONNX).

The pickled object is ultralytics' own ``ultralytics.nn.tasks.DetectionModel``
(built from the same YAML, holding the merged weights), not the project's
subclass, so the file loads where only ultralytics is installed.
"""

from __future__ import annotations

import copy
import hashlib
import io
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from models.errors import ConfigError, ExportError
from models.io import atomic_write_bytes

from export.onnx_export import _check_imgsz
from export.source import load_source
from service.layers.peft import has_peft_layers, merged_copy
from export.metadata import project_version

if TYPE_CHECKING:
    from models.detection import DetectionModel

#: Largest raw-output difference between the reloaded file and the source model, relative to the largest
#: output value (box coordinates in input pixels dominate): ultralytics fuses Conv+BN on load, fp16 rounds weights.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


@dataclass
class UltralyticsExportResult:
    """What :func:`export_ultralytics` wrote and how the reloaded file compared with the source model."""

    path: str
    size_bytes: int
    sha256: str
    source: str
    imgsz: int
    precision: str
    merged_adapters: bool
    ultralytics_version: str
    max_abs_diff: float | None
    frames_checked: int
    export_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_ultralytics_model(model: DetectionModel, imgsz: int):
    """ultralytics' own DetectionModel with ``model``'s (merged, float) weights, names and input size."""
    from ultralytics.nn.tasks import DetectionModel as UltralyticsDetectionModel

    plain = merged_copy(model).float().cpu().eval()
    arch = copy.deepcopy(plain.yaml)
    arch.pop("yaml_file", None)
    arch["nc"] = plain.nc
    out = UltralyticsDetectionModel(arch, ch=int(arch.get("channels", 3)), nc=plain.nc, verbose=False)
    state = plain.state_dict()
    try:
        out.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"the weights do not fit ultralytics' {type(out).__name__} for this YAML: {exc}") from exc
    out.names = {i: plain.names[i] for i in range(plain.nc)}
    out.task = "detect"
    out.args = {"task": "detect", "imgsz": int(imgsz)}
    for p in out.parameters():
        p.requires_grad_(False)
    return out.eval()


def _generated_inputs(imgsz: int, n: int = 2) -> list[np.ndarray]:
    from export.verify import generated_frames
    from models.processing import preprocess

    return [preprocess(frame, imgsz)[0] for frame in list(generated_frames())[:n]]


def export_ultralytics(
    source: Any,
    out: str | Path,
    imgsz: int | None = None,
    half: bool = False,
    best: bool = False,
    verify: bool = True,
    frames: Sequence[np.ndarray] | None = None,
) -> UltralyticsExportResult:
    """Write ``source`` (a DetectionModel, model dir, run dir or name) as an ultralytics checkpoint at ``out``.

    Args:
        imgsz: the input size ultralytics uses by default for this model (default: the model's own).
        half: store float16 weights, as ultralytics' trainer does (half the file; boxes move by a few
            hundredths of a pixel). Default float32: the same numbers as the project's exports.
        verify: reload the file the way ``YOLO()`` does and compare its raw output with the source model's
            on generated frames; raise ``ExportError`` beyond tolerance (``out`` is then not written).
        frames: preprocessed inputs ``(1, 3, H, W)`` for the check (default: generated frames).
    """
    import ultralytics

    out = Path(out)
    if out.suffix != ".pt":
        raise ConfigError(f"an ultralytics checkpoint ends in .pt, got {out}")
    start = time.perf_counter()
    model, description, _ = load_source(source, best=best)
    size = _check_imgsz(imgsz if imgsz is not None else model.imgsz, int(model.stride.max()))
    if size[0] != size[1]:
        raise ConfigError(f"ultralytics checkpoints carry one square imgsz, got {size}")
    converted = to_ultralytics_model(model, size[0])
    precision = "fp16" if half else "fp32"
    stored = copy.deepcopy(converted).half() if half else converted
    train_args = {"task": "detect", "mode": "train", "model": f"glasses-vision:{description}", "imgsz": size[0],
                  "data": None, "single_cls": False}
    ckpt = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": ultralytics.__version__,
        "license": "AGPL-3.0 (ultralytics architecture); weights: see the source model's card",
        "docs": "written by glasses-vision export --format ultralytics",
        "epoch": -1,
        "best_fitness": None,
        "model": stored,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": train_args,
        "train_metrics": None,
        "train_results": None,
        "glasses_vision": {"version": project_version(), "source": description, "precision": precision},
    }
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    data = buffer.getvalue()
    max_diff, checked = None, 0
    if verify:
        inputs = list(frames) if frames is not None else _generated_inputs(size[0])
        max_diff, scale, checked = _check_file(data, model, inputs, out)
        if not max_diff <= TOLERANCE[precision] * scale:
            raise ExportError(
                f"the reloaded ultralytics model differs from {description} by {max_diff:.3g} (tolerance "
                f"{TOLERANCE[precision]} x {scale:.3g}); {out} was not written"
            )
    atomic_write_bytes(out, data)
    return UltralyticsExportResult(
        path=str(out), size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), source=description,
        imgsz=size[0], precision=precision, merged_adapters=has_peft_layers(model),
        ultralytics_version=ultralytics.__version__, max_abs_diff=max_diff, frames_checked=checked,
        export_seconds=time.perf_counter() - start,
    )


def _check_file(data: bytes, model: torch.nn.Module, inputs: Sequence[np.ndarray], out: Path) -> tuple[float, float, int]:
    """Reload ``data`` with ultralytics' own loader (as ``YOLO()`` does) and compare raw outputs with ``model``."""
    import tempfile

    from ultralytics.nn.tasks import load_checkpoint

    reference = merged_copy(model).float().cpu().eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / out.name
        path.write_bytes(data)
        loaded, _ = load_checkpoint(str(path), device="cpu", fuse=True)
    worst, scale = 0.0, 1.0
    with torch.no_grad():
        for x in inputs:
            t = torch.from_numpy(np.asarray(x, np.float32))
            ref = reference(t)
            got = loaded(t)
            got = got[0] if isinstance(got, (tuple, list)) else got
            worst = max(worst, float((got - ref).abs().max()))
            scale = max(scale, float(ref.abs().max()))
    return worst, scale, len(inputs)
