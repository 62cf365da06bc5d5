"""quantize_onnx: int8 static (QDQ, calibrated, head kept float) and fp16, with size / latency / mAP reports."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from export import quantize_onnx
from export.quantize import ancestor_nodes, first_block_output, float_nodes, stem_nodes
from export.runtime import Detector
from export.verify import generated_frames
from models.processing import preprocess
from models.errors import ConfigError
from tests.helpers.export import same_boxes


def test_int8_static_calibrated_on_dataset(exported, export_dataset, tmp_path):
    _, result = exported
    out = tmp_path / "model.int8.onnx"
    report = quantize_onnx(result.path, out, calibration=export_dataset, dataset=export_dataset, max_calibration=6)
    assert report.threads == 1
    assert report.calibration_images == 6 and report.excluded_nodes > 0
    assert report.size_bytes < 0.5 * report.base_size_bytes
    assert report.latency_ms > 0 and report.base_latency_ms > 0
    assert report.metrics["images"] == report.base_metrics["images"] > 0 and math.isfinite(report.map50_95_change)
    proto = onnx.load(str(out))
    nodes = {n.name: n.op_type for n in proto.graph.node}
    assert "QuantizeLinear" in nodes.values()
    head_convs = [n for n in nodes if n.startswith("/model.23/cv") and nodes[n] == "Conv"]
    assert head_convs and any(n.startswith("/model.23/cv") and t == "DequantizeLinear" for n, t in nodes.items())
    decode = [n for n in nodes if n.startswith("/model.23/dfl") or n in ("/model.23/Concat_5", "/model.23/Div")]
    assert decode and all(nodes[n] not in ("QuantizeLinear", "DequantizeLinear") for n in decode)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["precision"] == "int8" and meta["quantization"] == "int8-static" and meta["names"]
    assert Detector(out).detect(generated_frames()[0], conf=0.25) is not None


def test_float_node_selection(exported):
    """keep_head_float leaves the whole head in float; by default only its decode tail; with neither, nothing."""
    _, result = exported
    proto = onnx.load(result.path)
    head = [n.name for n in proto.graph.node if n.name.startswith("/model.23/")]
    tail = [n for n in head if not n.startswith(("/model.23/cv2.", "/model.23/cv3."))]
    assert sorted(float_nodes(proto, "23", True, True)) == sorted(head)
    assert sorted(float_nodes(proto, "23", False, True)) == sorted(tail) and 0 < len(tail) < len(head)
    assert float_nodes(proto, "23", False, False) == [] and float_nodes(proto, "", True, True) == []


def test_stem_node_selection(exported):
    """The stem is the convolution that reads the frame, with its SiLU; nothing else."""
    _, result = exported
    proto = onnx.load(result.path)
    stem = stem_nodes(proto)
    ops = {n.name: n for n in proto.graph.node}
    assert [ops[n].op_type for n in stem] == ["Conv", "Sigmoid", "Mul"]
    conv = ops[stem[0]]
    assert conv.input[0] == proto.graph.input[0].name
    assert conv.output[0] in ops[stem[1]].input and {conv.output[0], ops[stem[1]].output[0]} == set(ops[stem[2]].input)


def test_stem_stays_float_by_default(exported, tmp_path):
    """Default: the frame reaches a float Conv (quantized after the stem); keep_stem_float=False quantizes the frame."""
    _, result = exported
    frames = generated_frames()
    stem_conv = stem_nodes(onnx.load(result.path))[0]

    def frame_consumers(path):
        proto = onnx.load(str(path))
        dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
        convs = [n for n in proto.graph.node if n.name == stem_conv]
        return ({n.op_type for n in proto.graph.node if proto.graph.input[0].name in n.input},
                convs and convs[0].input[1] in dequantized, {p.key: p.value for p in proto.metadata_props}["stem"])

    default = quantize_onnx(result.path, tmp_path / "d.onnx", calibration=frames, measure=False)
    assert frame_consumers(default.path) == ({"Conv"}, False, "float")
    quantized = quantize_onnx(result.path, tmp_path / "s.onnx", calibration=frames, measure=False,
                              keep_stem_float=False)
    assert frame_consumers(quantized.path) == ({"QuantizeLinear"}, True, "int8")
    assert quantized.excluded_nodes == default.excluded_nodes - 3
    front = quantize_onnx(result.path, tmp_path / "f.onnx", calibration=frames, measure=False, keep_stem_float=False,
                          float_until="auto")
    assert frame_consumers(front.path) == ({"Conv"}, False, "float")  # in the float front anyway


def test_onnxruntime_options_override_ours(exported, tmp_path):
    from onnxruntime.quantization import QuantFormat

    _, result = exported
    report = quantize_onnx(result.path, tmp_path / "q.onnx", calibration=generated_frames(), measure=False,
                           ort_options={"quant_format": QuantFormat.QOperator})
    proto = onnx.load(report.path)
    assert "QLinearConv" in {n.op_type for n in proto.graph.node}  # QOperator: the quantized ops are in the file
    assert "QOperator" in {p.key: p.value for p in proto.metadata_props}["quantize_static_overrides"]
    assert Detector(report.path).detect(generated_frames()[0], conf=0.25) is not None


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


def test_quantization_knobs_reach_the_graph_and_its_metadata(exported, tmp_path):
    _, result = exported
    frames = generated_frames()
    default = quantize_onnx(result.path, tmp_path / "d.onnx", calibration=frames, measure=False)
    knobs = quantize_onnx(result.path, tmp_path / "k.onnx", calibration=frames, measure=False, per_channel=False,
                          calibration_method="entropy", op_types=["Conv"])
    count = lambda path: sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)  # noqa: E731
    assert 0 < count(knobs.path) < count(default.path)  # SiLU / Concat / Add left in float: fewer quantized tensors
    meta = {p.key: p.value for p in onnx.load(knobs.path).metadata_props}
    assert meta["weights"] == "int8 per-tensor" and meta["calibration_method"] == "entropy"
    assert meta["activation_type"] == "uint8"
    assert {p.key: p.value for p in onnx.load(default.path).metadata_props}["weights"] == "int8 per-channel"
    with pytest.raises(ConfigError, match="unknown calibration method"):
        quantize_onnx(result.path, tmp_path / "q.onnx", calibration=frames, calibration_method="kl")
    with pytest.raises(ConfigError, match="unknown activation type"):
        quantize_onnx(result.path, tmp_path / "q.onnx", calibration=frames, activation_type="int4")


def _kernels(path, tmp_path) -> Counter:
    """Operator types of onnxruntime's optimised graph of ``path``: the kernels that run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{Path(path).stem}.optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_ancestor_nodes_are_the_front_of_the_network(exported):
    _, result = exported
    proto = onnx.load(result.path)
    assert first_block_output(proto) == "/model.2/cv2/conv/Conv"  # YOLO11's first C3k2
    front = ancestor_nodes(proto, "/model.2/cv2/conv/Conv")
    assert {"/model.0/conv/Conv", "/model.1/act/Mul", "/model.2/cv1/conv/Conv", "/model.2/m.0/Add",
            "/model.2/Concat"} <= set(front)
    assert not any(n.startswith(("/model.2/cv2/", "/model.3/", "/model.23/")) for n in front)
    assert ancestor_nodes(proto, "/model.0/conv/Conv") == []
    with pytest.raises(ConfigError, match="no node named"):
        ancestor_nodes(proto, "/model.99/conv/Conv")


def test_float_until_runs_the_front_as_float_convs(exported, tmp_path):
    """float_until ("auto": the first block's output conv): the front's convolutions keep float weights and run as
    float Conv with a fused SiLU; the named convolution and the rest run as int8; the decoded outputs stay close to
    the fp32 file's, as with the default (the stem alone float)."""
    _, result = exported
    frames = generated_frames()
    until = "/model.2/cv2/conv/Conv"
    stem_only = quantize_onnx(result.path, tmp_path / "s.onnx", calibration=frames, measure=False)
    front = quantize_onnx(result.path, tmp_path / "f.onnx", calibration=frames, measure=False, float_until="auto")
    named = quantize_onnx(result.path, tmp_path / "n.onnx", calibration=frames, measure=False, float_until=until)
    assert onnx.load(front.path).graph == onnx.load(named.path).graph
    front_convs = [n for n in ancestor_nodes(onnx.load(result.path), until) if n.endswith("/conv/Conv")]
    assert len(front_convs) == 5  # stem, layer 1, layer 2's cv1 and its bottleneck's two

    proto = onnx.load(front.path)
    dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    convs = {n.name: n for n in proto.graph.node if n.op_type == "Conv"}
    assert all(convs[n].input[1] not in dequantized for n in front_convs)
    assert convs[until].input[1] in dequantized and convs["/model.3/conv/Conv"].input[1] in dequantized
    meta = lambda r: {p.key: p.value for p in onnx.load(r.path).metadata_props}  # noqa: E731
    assert meta(front)["float_until"] == until and meta(stem_only)["float_until"] == "none"
    assert front.excluded_nodes > stem_only.excluded_nodes

    ran_stem, ran_front = _kernels(stem_only.path, tmp_path), _kernels(front.path, tmp_path)
    assert ran_front["QLinearConv"] == ran_stem["QLinearConv"] - 4  # the stem is float in both
    assert ran_front["QuickGelu"] == ran_stem["QuickGelu"] + 4  # x * sigmoid(x) fused, in float
    assert ran_front["QLinearSigmoid"] == ran_stem["QLinearSigmoid"] - 4

    x, _ = preprocess(frames[0], Detector(result.path).imgsz)
    fp32 = Detector(result.path).raw(x)[0]  # (4 + nc, anchors): boxes in input pixels, then class scores
    for report in (stem_only, front):
        int8 = Detector(report.path).raw(x)[0]
        box_error, score_error = np.abs(int8[:4] - fp32[:4]), np.abs(int8[4:] - fp32[4:])
        assert float(np.median(box_error)) < 1.0 and float(score_error.max()) < 0.05
