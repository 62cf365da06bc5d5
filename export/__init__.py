"""Merge -> ONNX -> verify -> quantize, the torch-free glasses runtime and its drawing, and the way back to ultralytics.

Names are imported lazily so that ``export.runtime`` (onnxruntime + numpy) can
be imported where torch is not installed.
"""

from __future__ import annotations

from importlib import import_module

_LAZY = {
    "export_onnx": "export.onnx_export",
    "ExportResult": "export.onnx_export",
    "load_source": "export.source",
    "verify_onnx": "export.verify",
    "VerifyReport": "export.verify",
    "quantize_onnx": "export.quantize",
    "QuantizeReport": "export.quantize",
    "Detector": "export.runtime",
    "Detection": "export.runtime",
    "export_ultralytics": "export.ultralytics_export",
    "draw_detections": "export.draw",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
