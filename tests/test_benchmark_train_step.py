"""The training-step benchmark: a --quick run times ours and ultralytics' trainer and writes its report."""

from __future__ import annotations

import importlib
import json

import pytest


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("benchmarks.train_step")


def test_every_recipe_setup_is_a_configuration_the_recipe_accepts(bench):
    from training.config import TrainConfig

    names = [s.name for s in bench.SETUPS]
    assert len(names) == len(set(names)) and bench.REFERENCE in names and set(bench.GOALS) <= set(names)
    for s in bench.SETUPS:
        if s.kind == "recipe":
            TrainConfig(data="x.yaml", **s.config).validate()


def test_summary_ratios_and_goals(bench):
    scale = bench.Scale(batch=16, steps=4, warmup=1, rounds=2)
    setups = [s for s in bench.SETUPS if s.name in ("full-adamw", "lora-coap", "lora-coap-ckpt", "ultralytics")]
    per_step = {"full-adamw": 0.9, "lora-coap": 0.8, "lora-coap-ckpt": 1.0, "ultralytics": 1.0}
    runs = [{"setup": name, "round": r, "intervals": [5.0] + [t] * 3, "median_s": t, "loop_wall_s": 5 + 3 * t,
             "call_wall_s": 9.0, "workers": 0, "augmentation": "a", "load_average": [1.0, 1.0, 1.0]}
            for r in range(2) for name, t in per_step.items()]
    rows = {r["setup"].name: r for r in bench.summarize(setups, runs, scale)}
    assert rows["full-adamw"]["median_s"] == 0.9  # the warm-up step (5 s) is left out
    assert rows["full-adamw"]["ratio"] == pytest.approx(0.9) and rows["full-adamw"]["round_ratios"] == [0.9, 0.9]
    assert rows["ultralytics"]["images_per_s"] == pytest.approx(16.0)
    text = "\n".join(bench.goals(list(rows.values())))
    assert "full-adamw: 0.90x ultralytics' time per step (goal <= 1.0x): met" in text
    assert "lora-coap-ckpt: 1.00x" in text and "checkpointing costs lora-coap-ckpt 1.25x" in text


def test_quick_run_times_both_trainers_and_writes_the_report(bench, tmp_path):
    import torch

    out = tmp_path / "bench"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--out", str(out), "--quick", "--setups", "full-adamw,ultralytics", "--threads", "1",
                           "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((out / "results.json").read_text())
    assert [r["setup"] for r in results["runs"]] == ["full-adamw", "ultralytics"]
    for record in results["runs"]:
        assert len(record["intervals"]) == bench.QUICK.steps and record["median_s"] > 0
        assert record["workers"] == 0 and len(record["load_average"]) == 3
    text = (out / "train_step.md").read_text()
    assert "| ours: full FT, AdamW |" in text and "| ultralytics' trainer: full FT, AdamW |" in text
    assert "- full-adamw:" in text and "--quick" in text


def test_op_profile_prints_torch_ops_per_step(bench, tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        assert bench.main(["--out", str(tmp_path / "bench"), "--quick", "--op-profile", "full-adamw", "--threads", "1",
                           "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "op (self CPU ms per step)" in text and "full-adamw" in text
    rows = [line for line in text.splitlines() if line.startswith("aten::")]
    assert rows and any(line.startswith("aten::convolution_backward") for line in rows)
    assert all(float(line.split()[-1]) >= 0 for line in rows)
