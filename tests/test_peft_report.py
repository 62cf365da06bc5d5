"""The benchmark report script generates its tables from the models."""

from __future__ import annotations

import importlib.util
from pathlib import Path



def test_peft_report_script_generates_tables(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peft_report.py"
    spec = importlib.util.spec_from_file_location("peft_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "peft.md"
    assert module.main(["--archs", "yolo11n", "--nc", "3", "--no-detail", "--out", str(out)]) == 0
    text = out.read_text()
    assert module.COMMAND in text
    for title, _, _ in module.SETTINGS:
        assert f"| {title} |" in text
    assert text.count("\n| ") >= 2 + len(module.SETTINGS)
