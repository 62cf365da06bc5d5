"""The domain-shift benchmark script: a --quick run writes its table, plot and cache, and resumes from the cache."""

from __future__ import annotations

import importlib
import json

import pytest

ROWS = "lora-coap-ckpt,adapters,full-adamw,full-adamw-replay"


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("benchmarks.adaptation")


def test_pareto_front_keeps_only_points_nobody_beats(bench):
    points = [(10, 0.5, "a"), (20, 0.4, "b"), (20, 0.7, "c"), (5, 0.1, "d"), (30, 0.7, "e")]
    assert [p[2] for p in bench.pareto(points)] == ["d", "a", "c"]


def test_every_setup_has_a_unique_name_and_known_settings(bench):
    from training.config import TrainConfig

    names = [s.name for s in bench.SETUPS]
    assert len(names) == len(set(names))
    for s in bench.SETUPS:
        if s.kind == "recipe" and s.mergeable:
            replay = {"replay": "source.yaml"} if s.config.get("replay_fraction") else {}
            TrainConfig(data="x.yaml", **s.config, **replay).validate()  # every row is a configuration the recipe accepts


def test_quick_run_writes_report_plot_and_cache_then_resumes(bench, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    assert bench.main(["--out", str(out), "--quick", "--rows", ROWS, "--threads", "1", "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"zero-shot/0", "lora-coap-ckpt/0", "adapters/0", "full-adamw/0", "full-adamw-replay/0",
                            "ceiling"}
    for key, record in results.items():
        assert 0.0 <= record["target_map50_95"] <= 1.0, key
    full, lora = results["full-adamw/0"], results["lora-coap-ckpt/0"]
    assert full["trainable_percent"] > 99 and 0 < lora["trainable_percent"] < 20
    assert 0 < results["adapters/0"]["trainable_percent"] < 20  # the base stays frozen under the adapters
    assert 0 < lora["bytes"] < full["bytes"]  # checkpointing + a frozen base: fewer exact bytes
    assert lora["adapter_bytes"] > 0
    text = (out / "adaptation.md").read_text()
    assert "| LoRA r=8 + COAP + checkpointing |" in text and "## Goals" in text
    assert "not mergeable" in text and "In-domain ceiling" in text
    assert (out / "adaptation.png").stat().st_size > 10_000

    # a second call finds every run in the cache and trains nothing
    from training import recipe

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(recipe, "train", no_training)
    assert bench.main(["--out", str(out), "--quick", "--rows", ROWS, "--threads", "1", "--quiet"]) == 0
    # a re-render keeps the hand-written parts: the analysis after the report, and sections between its title and
    # its generated part (re-runs of some rows); before, the sections on top were dropped
    doc = out / "adaptation.md"
    first = doc.read_text()
    title, rest = first.split("\n", 1)
    rerun = "## Re-measured: main rows\n\n| a re-run's table |\n\n## The full run\n"
    doc.write_text(f"{title}\n\n{rerun}{rest}\n## What the table says\n\n- a reading of the table\n")
    assert bench.main(["--out", str(out), "--quick", "--rows", ROWS, "--threads", "1", "--quiet"]) == 0
    rerendered = doc.read_text()
    assert rerendered.count("## What the table says") == 1 and rerendered.endswith("- a reading of the table\n")
    assert rerendered.startswith(f"{title}\n\n{rerun}\nCommand: `") and rerendered.count(rerun) == 1
    assert "## Goals" in rerendered
