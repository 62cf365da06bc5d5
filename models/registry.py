"""A registry of named detectors in the style of timm's ``create_model``.

``list_models()`` names every architecture and the shipped base model;
``create_model(name, ...)`` builds one. Unknown names are answered with the list.
"""

from __future__ import annotations

from pathlib import Path

from models.detection import DetectionModel, architecture_names
from models.errors import NotFoundError

#: The base detector shipped with the project (trained on the synthetic source domain).
BASE_MODEL_DIR = Path(__file__).parent / "weights" / "base"
BASE_MODEL_NAME = "glasses-base-yolo11n"


def list_models() -> list[str]:
    """Every name :func:`create_model` accepts."""
    return [BASE_MODEL_NAME, *architecture_names()]


def load_base_model() -> DetectionModel:
    """The shipped base detector (see ``models/weights/base/card.json``)."""
    if not (BASE_MODEL_DIR / "model.safetensors").is_file():
        raise NotFoundError(f"the shipped base model is missing from {BASE_MODEL_DIR}; reinstall the package")
    return DetectionModel.load(BASE_MODEL_DIR)


def create_model(name: str, nc: int | None = None, names: list[str] | None = None, imgsz: int = 640) -> DetectionModel:
    """Build a model by name; a path to a saved model directory loads it instead.

    ``glasses-base-yolo11n`` is the shipped, trained base; the architecture names
    (``yolo11n`` ... ``yolov8x``) are freshly initialised.
    """
    if name == BASE_MODEL_NAME:
        return load_base_model()
    if name in architecture_names():
        return DetectionModel(name, nc=nc or (len(names) if names else 80), names=names, imgsz=imgsz)
    path = Path(name)
    if path.is_dir() and (path / "config.json").is_file():
        return DetectionModel.load(path)
    raise NotFoundError(f"unknown model {name!r}; known names: {', '.join(list_models())}, or a saved model directory")
