"""benchmarks/onnx_latency.py: the DFL-softmax rewrite computes the same function, and the timing table prints."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from benchmarks.onnx_latency import dfl_softmax_on_bins_axis, main


def test_dfl_rewrite_is_the_same_function(exported, tmp_path):
    _, result = exported
    rewritten = dfl_softmax_on_bins_axis(result.path, tmp_path / "dfl.onnx")
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (result.path, rewritten))
    x = np.random.default_rng(0).random(tuple(a.get_inputs()[0].shape), dtype=np.float32)
    np.testing.assert_allclose(a.run(None, {"images": x})[0], b.run(None, {"images": x})[0], rtol=1e-5, atol=1e-4)
    ops = [n.op_type for n in __import__("onnx").load(str(rewritten)).graph.node if "/dfl/" in n.name]
    assert ops.index("Softmax") < ops.index("Transpose")  # softmax first, over the bins' axis


def test_table_has_a_row_per_file(exported, capsys):
    _, result = exported
    assert main([str(result.path), str(result.path), "--rounds", "2", "--dfl-rewrite"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == 3 and "(again)" in rows[1] and "DFL softmax" in rows[2]  # the file twice + its rewrite
