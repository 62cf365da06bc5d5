"""``glasses-vision export``: a run dir to a verified file, int8 with calibration, clear errors."""

from __future__ import annotations

import json

from service.cli import main
from tests.helpers.models import firing_model


def test_export_cli_run_dir_and_int8(tmp_path, export_dataset, capsys):
    run = tmp_path / "runs" / "kitchen"
    firing_model(seed=3).save(run / "merged")
    out = tmp_path / "kitchen.onnx"
    assert main(["export", "--from", str(run), "--out", str(out), "--imgsz", "64", "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "parity with PyTorch: ok" in text and "latency (batch 1, 1 thread)" in text and "MB" in text
    assert "batch 1," in text  # the glasses default: a static batch of 1
    assert main(["export", "--from", str(run), "--out", str(tmp_path / "server.onnx"), "--imgsz", "64", "--no-verify",
                 "--dynamic-batch"]) == 0
    assert "batch dynamic" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["export"]["verification"]["passed"] is True

    q = tmp_path / "kitchen8.onnx"
    assert main(["export", "--from", str(run), "--out", str(q), "--imgsz", "64", "--int8", "--calib", str(export_dataset),
                 "--calib-frames", "4", "--no-verify"]) == 0
    text = capsys.readouterr().out
    assert "int8 ->" in text and "4 calibration frames" in text and q.is_file()
    assert (tmp_path / "kitchen8.fp32.onnx").is_file()


def test_export_cli_errors(tmp_path, capsys):
    assert main(["export", "--from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", "--from", "x", "--out", str(tmp_path / "x.onnx"), "--int8"]) == 2
    assert "--calib" in capsys.readouterr().err
