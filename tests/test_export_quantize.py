"""quantize_onnx: int8 static (QDQ, calibrated, head kept float) and fp16, with size / latency / mAP reports."""

from __future__ import annotations

import math

import onnx
import pytest

from export import quantize_onnx
from export.runtime import Detector
from export.verify import generated_frames
from models.errors import ConfigError
from tests.export_fixtures import export_model, exported, same_boxes, tiny_dataset  # noqa: F401


def test_int8_static_calibrated_on_dataset(exported, tiny_dataset, tmp_path):
    _, result = exported
    out = tmp_path / "model.int8.onnx"
    report = quantize_onnx(result.path, out, calibration=tiny_dataset, dataset=tiny_dataset, max_calibration=6)
    assert report.threads == 1
    assert report.calibration_images == 6 and report.excluded_nodes > 0
    assert report.size_bytes < 0.5 * report.base_size_bytes
    assert report.latency_ms > 0 and report.base_latency_ms > 0
    assert report.metrics["images"] == report.base_metrics["images"] > 0 and math.isfinite(report.map50_95_change)
    proto = onnx.load(str(out))
    quantized = [n.name for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert quantized and not any(n.startswith("/model.23/") and "QuantizeLinear" not in n for n in quantized)
    head_ops = {n.op_type for n in proto.graph.node if n.name.startswith("/model.23/")}
    assert "Conv" in head_ops and "DequantizeLinear" not in head_ops  # the Detect head stays float
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["precision"] == "int8" and meta["quantization"] == "int8-static" and meta["names"]
    assert Detector(out).detect(generated_frames()[0], conf=0.25) is not None


def test_fp16_and_frames_as_calibration(exported, tmp_path):
    _, result = exported
    base = Detector(result.path)
    half = tmp_path / "model.fp16.onnx"
    report = quantize_onnx(result.path, half, mode="fp16", measure=False)
    assert report.size_ratio < 0.55 and report.metrics is None
    frame = generated_frames()[0]
    a, b = base.detect(frame), Detector(half).detect(frame)
    as_tuple = lambda ds: ([d.box for d in ds], [d.score for d in ds], [d.class_id for d in ds])  # noqa: E731
    assert len(b) and same_boxes(as_tuple(a), as_tuple(b), match_iou=0.9)
    with pytest.raises(ConfigError, match="already fp16"):
        quantize_onnx(half, tmp_path / "again.onnx", mode="fp16", measure=False)


def test_bad_quantization_requests(exported, tmp_path):
    _, result = exported
    with pytest.raises(ConfigError, match="needs calibration frames"):
        quantize_onnx(result.path, tmp_path / "q.onnx", calibration=None, measure=False)
    with pytest.raises(ConfigError, match="needs calibration frames"):
        quantize_onnx(result.path, tmp_path / "q.onnx", calibration=[], measure=False)
    with pytest.raises(ConfigError, match="does not exist"):
        quantize_onnx(result.path, tmp_path / "q.onnx", calibration=tmp_path / "missing.yaml", measure=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no calibration images"):
        quantize_onnx(result.path, tmp_path / "q.onnx", calibration=tmp_path / "empty", measure=False)
    with pytest.raises(ConfigError, match="unknown quantization mode"):
        quantize_onnx(result.path, tmp_path / "q.onnx", calibration=[], mode="int4")
    assert not (tmp_path / "q.onnx").exists()
