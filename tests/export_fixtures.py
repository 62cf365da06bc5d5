"""Shared by the export / runtime tests: a small detector that actually fires, its export, a tiny dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import DetectionModel
from models.processing import box_iou

IMGSZ = 128
NAMES = ["cup", "bottle", "phone", "book", "keyboard", "food_label"]  # training.data.synthetic.CLASS_NAMES


def make_model(seed: int = 0, imgsz: int = IMGSZ) -> DetectionModel:
    """yolo11n with random class biases, so an untrained model gives plenty of boxes above conf 0.25."""
    torch.manual_seed(seed)
    model = DetectionModel("yolo11n", names=NAMES, imgsz=imgsz).eval()
    with torch.no_grad():
        for branch in model.model[-1].cv3:
            branch[-1].bias.normal_(0.0, 1.5)
    return model


def same_boxes(a, b, match_iou: float = 0.99) -> bool:
    """Same number of boxes and each box of ``a`` has a same-class box in ``b`` with IoU >= match_iou."""
    (ba, _, ca), (bb, _, cb) = a, b
    if len(ba) != len(bb):
        return False
    if not len(ba):
        return True
    iou = box_iou(np.asarray(ba, np.float32), np.asarray(bb, np.float32))
    iou[np.asarray(ca)[:, None] != np.asarray(cb)[None, :]] = 0
    return bool((iou.max(1) >= match_iou).all())


# Session fixtures imported into several test modules are set up once per module by pytest;
# these caches make the model, its export and the dataset once per test session.
_CACHE: dict[str, object] = {}


@pytest.fixture(scope="session")
def export_model() -> DetectionModel:
    if "model" not in _CACHE:
        _CACHE["model"] = make_model()
    return _CACHE["model"]


@pytest.fixture(scope="session")
def exported(tmp_path_factory, export_model):
    """``(model, ExportResult)`` of the fp32 export (verified by export_onnx itself)."""
    from export import export_onnx

    if "exported" not in _CACHE:
        out = tmp_path_factory.mktemp("export") / "model.onnx"
        _CACHE["exported"] = (export_model, export_onnx(export_model, out))
    return _CACHE["exported"]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    from training.data.synthetic import generate_dataset

    if "dataset" not in _CACHE:
        _CACHE["dataset"] = generate_dataset(tmp_path_factory.mktemp("exds"), domain="egocentric", n=10, imgsz=IMGSZ, seed=0)
    return _CACHE["dataset"]
