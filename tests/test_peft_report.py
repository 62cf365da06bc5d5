"""The benchmark report script generates its tables from the models: every figure matches a count made here."""

from __future__ import annotations

import importlib
import re
import warnings

import pytest


def _load_script():
    return importlib.import_module("benchmarks.peft_report")


def _rows(text: str, titles: set[str]) -> dict[str, list[float]]:
    """``title -> [trainable params, trainable %, trainable bytes, backbone %, neck %, head %, total bytes]``."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in titles:
            rows[cells[0]] = [float(c.replace(",", "")) for c in cells[2:]]
    return rows


def test_peft_report_script_generates_tables(tmp_path):
    module = _load_script()
    out = tmp_path / "peft.md"
    assert module.main(["--archs", "yolo11n", "--nc", "3", "--no-detail", "--out", str(out)]) == 0
    text = out.read_text()
    assert module.COMMAND in text

    base = module.build("yolo11n", 3)
    n_base = sum(p.numel() for p in base.parameters())
    assert re.search(rf"Base model: {n_base:,} parameters, {4 * n_base:,} bytes fp32\.", text)

    titles = {title for title, _, _ in module.SETTINGS}
    rows = _rows(text, titles)
    assert rows.keys() == titles
    for title, _, apply in module.SETTINGS:
        model = module.build("yolo11n", 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in trainable)
        n_params = sum(p.numel() for p in model.parameters())
        n_train_r, share, train_bytes, *parts, total_bytes = rows[title]
        assert n_train_r == n_train > 0, title
        assert train_bytes == sum(p.numel() * p.element_size() for p in trainable), title
        if title.startswith("QLoRA"):  # the NF4 base is stored packed: count its weights, not its storage
            assert share == pytest.approx(100 * n_train / (n_base + n_train), abs=5e-4)
            assert train_bytes < total_bytes < 4 * n_base / 2
        else:
            assert share == pytest.approx(100 * n_train / n_params, abs=5e-4), title
            assert total_bytes == sum(p.numel() * p.element_size() for p in model.parameters()), title

    part_shares = {title: row[3:6] for title, row in rows.items()}  # backbone %, neck %, head %
    assert part_shares["LoRA r=8, backbone"][0] > 0 and part_shares["LoRA r=8, backbone"][1:] == [0, 0]
    backbone, neck, head = part_shares["Adapters (neck, reduction 16)"]
    assert backbone == head == 0 and neck > 0
    assert all(v > 0 for v in part_shares["BitFit"]) and rows["BitFit"][6] == 4 * n_base  # BitFit adds no tensor
    # DoRA = LoRA on the same layers + one magnitude per output channel
    assert rows["LoRA r=8, backbone"][0] < rows["LoRA r=8, backbone+neck"][0] < rows["DoRA r=8, backbone+neck"][0]
