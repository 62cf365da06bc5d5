"""benchmarks/onnx_latency.py: the timing table has a row per file (a file named twice is timed twice)."""

from __future__ import annotations

from benchmarks.onnx_latency import main


def test_table_has_a_row_per_file(exported, capsys):
    _, result = exported
    assert main([str(result.path), str(result.path), "--rounds", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == 2 and "(again)" in rows[1]
