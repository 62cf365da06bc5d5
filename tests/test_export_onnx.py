"""export_onnx: metadata, parity with PyTorch, sources (model / model dir / run dir / LoRA), bad input."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import export_onnx, verify_onnx
from export.onnx_export import _state_sha256
from export.verify import generated_frames
from models.errors import CheckpointError, ConfigError, ExportError
from models.processing import preprocess
from service.layers.peft import has_peft_layers
from tests.helpers.models import IMGSZ, NAMES, firing_model


def test_metadata_and_verification(exported):
    model, result = exported
    report = result.verification
    assert report.passed and report.required > 0 and report.matched == report.required  # not a vacuous check
    assert report.images == 4 and report.max_box_diff < 0.05 and report.max_score_diff < 1e-3
    proto = onnx.load(result.path)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["names"]) == NAMES and meta["nc"] == "6"
    assert json.loads(meta["stride"]) == [8, 16, 32] and json.loads(meta["imgsz"]) == [IMGSZ, IMGSZ]
    pre = json.loads(meta["preprocessing"])
    assert pre["letterbox_color"] == 114 and pre["channel_order"] == "RGB" and pre["layout"] == "NCHW"
    assert pre["scale"] == "1/255"
    assert json.loads(meta["output_layout"])["shape"] == [1, 10, 336] and meta["dynamic_batch"] == "false"
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 3, IMGSZ, IMGSZ]  # glasses default
    assert meta["project_version"] and meta["precision"] == "fp32" and meta["opset"] == "17"
    # the checkpoint hash is that of the weights as DetectionModel.save writes them
    assert meta["source_sha256"] == result.source_sha256 and len(result.source_sha256) == 64
    assert result.sha256 == hashlib.sha256(Path(result.path).read_bytes()).hexdigest()
    assert "Identity" not in result.op_counts and "BatchNormalization" not in result.op_counts  # cleaned + fused
    assert not list(Path(result.path).parent.glob(".*staging*"))  # no temporary file left behind


def test_dfl_softmax_runs_on_the_bins_axis_with_the_same_result(exported):
    from ultralytics.nn.modules.block import DFL

    from export.onnx_export import BinsAxisDFL

    dfl = DFL(16)
    x = torch.randn(2, 64, 50)
    torch.testing.assert_close(BinsAxisDFL(dfl)(x), dfl(x), rtol=1e-5, atol=1e-5)
    _, result = exported
    softmax = [n for n in onnx.load(result.path).graph.node if n.op_type == "Softmax" and "/dfl/" in n.name]
    assert [a.i for n in softmax for a in n.attribute if a.name == "axis"] == [2]  # (B, 4, 16, A): the bins' axis


def test_dynamic_batch_matches_pytorch(exported, tmp_path):
    model, static = exported
    result = export_onnx(model, tmp_path / "dynamic.onnx", dynamic_batch=True, verify=False)
    meta = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert json.loads(meta["output_layout"])["shape"] == ["batch", 10, 336] and meta["dynamic_batch"] == "true"
    x = np.concatenate([preprocess(f, IMGSZ)[0] for f in generated_frames()])
    out = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape == (2, 10, 336)
    assert np.abs(out - ref).max() < 1e-3
    assert model.training is False and not has_peft_layers(model)
    # the static (default) file takes a batch too, one frame at a time, with the same numbers
    from export.runtime import Detector

    det_static, det_dynamic = Detector(static.path), Detector(result.path)
    assert det_static.batch_size == 1 and det_dynamic.batch_size is None
    assert np.abs(det_static.raw(x) - out).max() < 1e-4


def test_export_from_model_and_run_dirs(tmp_path):
    model = firing_model(seed=1)
    run = tmp_path / "runs" / "kitchen"
    model.save(run / "merged")
    best = firing_model(seed=2)
    best.save(run / "best")
    r = export_onnx(run, tmp_path / "merged.onnx", imgsz=64, verify=False)
    assert r.source == str(run / "merged")
    assert r.source_sha256 == hashlib.sha256((run / "merged" / "model.safetensors").read_bytes()).hexdigest()
    # in memory the same weights hash the same: the hash identifies the checkpoint, not the file name
    assert _state_sha256(model) == r.source_sha256
    rb = export_onnx(run, tmp_path / "best.onnx", best=True, imgsz=(64, 96), verify=False)  # rectangular input
    assert rb.source == str(run / "best") and rb.imgsz == (64, 96)
    assert json.loads(rb.metadata["imgsz"]) == [64, 96]
    from export.runtime import Detector

    assert Detector(rb.path).imgsz == (64, 96) and isinstance(Detector(rb.path).detect(generated_frames()[1]), list)
    assert rb.source_sha256 != r.source_sha256


def test_merged_lora_export_has_base_operators(exported, tmp_path):
    from service.layers.peft import apply_lora

    base, base_result = exported
    tuned = copy.deepcopy(base)
    apply_lora(tuned, rank=4, targets=["backbone", "neck"])
    with torch.no_grad():  # a trained adapter: non-zero B, so merging changes the weights
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    assert has_peft_layers(tuned)
    result = export_onnx(tuned, tmp_path / "lora.onnx", images=generated_frames())  # checked against the *unmerged* model
    assert result.merged_adapters and result.verification.passed and result.verification.required > 0
    assert result.op_counts == base_result.op_counts and result.num_nodes == base_result.num_nodes
    assert has_peft_layers(tuned)  # the caller's model is untouched
    assert result.sha256 != base_result.sha256


def test_half_export(exported, tmp_path):
    model, base = exported
    r = export_onnx(model, tmp_path / "half.onnx", half=True, images=generated_frames()[:1])
    assert r.precision == "fp16" and r.verification.passed
    assert r.size_bytes < 0.6 * base.size_bytes


def test_verification_catches_a_wrong_model(exported, tmp_path, monkeypatch):
    model, result = exported
    other = firing_model(seed=7)
    report = verify_onnx(result.path, other, images=generated_frames()[:1])
    assert not report.passed and report.max_abs_diff > 0.05

    import export.onnx_export as exporter

    real = exporter.verify_onnx
    monkeypatch.setattr(exporter, "verify_onnx", lambda path, source, images=None: real(path, other, images))
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="does not match the PyTorch model"):
        export_onnx(model, out, images=generated_frames()[:1])
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-done left on disk


def test_bad_sources(tmp_path, export_model):
    with pytest.raises(ExportError, match="cannot export a int"):
        export_onnx(3, tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="cannot export a Linear"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="is a file, not a model"):
        export_onnx(junk, tmp_path / "x.onnx")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="neither a model directory"):
        export_onnx(tmp_path / "empty_run", tmp_path / "x.onnx")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_onnx(tmp_path / "nowhere", tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="not a positive multiple of the model stride 32"):
        export_onnx(export_model, tmp_path / "x.onnx", imgsz=100)
    with pytest.raises(ConfigError, match="nms=True is not supported"):
        export_onnx(export_model, tmp_path / "x.onnx", nms=True)
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(export_model, tmp_path / "x.onnx", opset=9)
    with pytest.raises(ConfigError, match=r"\.onnx"):
        export_onnx(export_model, tmp_path / "x.pt")
    assert not (tmp_path / "x.onnx").exists()


def test_qlora_export_is_dequantised_plain_graph(exported, tmp_path):
    from service.layers.peft import apply_qlora

    base, base_result = exported
    tuned = copy.deepcopy(base)
    apply_qlora(tuned, rank=4, targets=["neck"])
    result = export_onnx(tuned, tmp_path / "qlora.onnx", images=generated_frames()[:1])  # vs the NF4 model itself
    assert result.merged_adapters and result.verification.passed and result.verification.required > 0
    assert result.op_counts == base_result.op_counts  # NF4 bases came back as float weights, no extra ops
