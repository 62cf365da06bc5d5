"""benchmarks/onnx_latency.py: the timing table has a row per file (a file named twice is timed twice); --profile
adds the kernel time by operator type."""

from __future__ import annotations

from benchmarks.onnx_latency import main


def test_table_has_a_row_per_file(exported, capsys):
    _, result = exported
    assert main([str(result.path), str(result.path), "--rounds", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == 2 and "(again)" in rows[1]


def test_profile_table_by_operator_type(exported, capsys):
    _, result = exported
    assert main([str(result.path), "--rounds", "2", "--profile", "2"]) == 0
    out = capsys.readouterr().out.split("onnxruntime profiler")[1]
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert "Conv" in rows and "%" in rows["Conv"]
    assert rows["total"].rstrip(" |").endswith("kernels)")


def test_batch_scaling_table_per_batch_size(tmp_path, export_model, capsys):
    from export import export_onnx

    result = export_onnx(export_model, tmp_path / "dynamic.onnx", dynamic_batch=True, verify=False)
    assert main([str(result.path), "--rounds", "2", "--batches", "4,1,2"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "x |" in line]
    assert [row[0].strip("| ") for row in rows] == ["1", "2", "4"]
    assert rows[0][2] == "1.00x"


def test_batch_scaling_refuses_a_static_batch_file(exported, capsys):
    _, result = exported
    assert main([str(result.path), "--rounds", "1", "--batches", "1,2"]) == 2
    assert "--dynamic-batch" in capsys.readouterr().err


def test_batch_sizes_must_be_positive(exported):
    import pytest

    _, result = exported
    with pytest.raises(SystemExit):
        main([str(result.path), "--batches", "0,2"])
