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
