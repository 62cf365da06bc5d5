"""Datasets (YOLO txt, COCO json, synthetic) behind one interface, augmentation and collate.

Names are imported lazily so that the torch-free parts (the synthetic generator,
``data.yaml`` reading and writing) load quickly, e.g. for the CLI's ``--help``.
"""

from __future__ import annotations

from importlib import import_module

_LAZY = {
    "AugmentConfig": "training.data.augment",
    "DetectionAugment": "training.data.augment",
    "DataProblem": "training.data.dataset",
    "DetectionDataset": "training.data.dataset",
    "build_dataset": "training.data.build",
    "collate": "training.data.dataset",
    "load_image": "training.data.dataset",
    "read_data_yaml": "training.data.yolo",
    "write_data_yaml": "training.data.yolo",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'training.data' has no attribute {name!r}")
