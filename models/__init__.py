"""YOLO-style detection models: the DetectionModel, its registry, checkpoint I/O.

Submodules that need torch (``detection``, ``registry``) are imported lazily so
that ``models.processing`` and ``models.errors`` stay usable where torch is absent
(the exported runtime).
"""

from __future__ import annotations

from importlib import import_module

_LAZY = {
    "DetectionModel": "models.detection",
    "ModelPart": "models.detection",
    "create_model": "models.registry",
    "list_models": "models.registry",
    "load_base_model": "models.registry",
    "BASE_MODEL_DIR": "models.registry",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
