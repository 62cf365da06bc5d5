"""What an export starts from: a DetectionModel, a model directory, a run directory or a registered name.

``load_source`` is the one loader used by the ONNX exporter, its verification, the ultralytics
export and ``predict``; folding adapters into plain weights is ``service.layers.peft.merged_copy``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import CheckpointError, ExportError
from models.io import file_sha256

if TYPE_CHECKING:
    from models.detection import DetectionModel


def _model_dir(path: Path, best: bool) -> Path:
    """A model dir itself, or a run dir's ``best/`` / ``merged/``."""
    if (path / "config.json").is_file():
        return path
    candidates = ["best", "merged"] if best else ["merged"]
    for name in candidates:
        if (path / name / "config.json").is_file():
            return path / name
    want = "best/ or merged/" if best else "merged/"
    raise CheckpointError(
        f"{path} is neither a model directory (config.json + model.safetensors) nor a run directory with {want}; "
        "pass the output of `glasses-vision train` or a saved model"
    )


def load_source(source: Any, best: bool = False) -> tuple[DetectionModel, str, str]:
    """``(model in eval mode, description, checkpoint sha256)`` for a DetectionModel, a model / run dir or a model name."""
    from models.detection import DetectionModel

    if isinstance(source, DetectionModel):
        return source, f"in-memory {type(source).__name__}", ""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.exists():
            if not path.is_dir():
                raise CheckpointError(
                    f"{path} is a file, not a model: pass a model directory (config.json + model.safetensors), "
                    "a run directory or a model name"
                )
            model_dir = _model_dir(path, best)
            model = DetectionModel.load(model_dir)
            return model, str(model_dir), file_sha256(model_dir / "model.safetensors")
        from models.registry import list_models

        if str(source) in list_models():
            from models.registry import BASE_MODEL_DIR, create_model

            model = create_model(str(source)).eval()
            weights = BASE_MODEL_DIR / "model.safetensors"
            sha = file_sha256(weights) if weights.is_file() and str(source).startswith("glasses-base") else ""
            return model, str(source), sha
        raise CheckpointError(f"{source} does not exist; pass a model directory, a run directory or a model name")
    raise ExportError(
        f"cannot export a {type(source).__name__}: pass a DetectionModel, a model directory, a run directory or a model name"
    )
