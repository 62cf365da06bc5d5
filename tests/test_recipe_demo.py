"""The demo's pipeline on a few frames: base before -> LoRA + COAP + checkpointing -> after, outputs under --out."""

from __future__ import annotations

import json

from service.commands.demo import run_demo


def test_demo_pipeline_small(tmp_path):
    s = run_demo(tmp_path / "demo", frames=24, epochs=1, export=False, quiet=True)
    assert s["frames"] == {"train": 16, "val": 8, "imgsz": s["frames"]["imgsz"]}
    assert 0 <= s["map50_95_before"] <= 1 and 0 <= s["map50_95_after"] <= 1
    assert 0 < s["trainable_percent"] < 20 and s["steps"] == 2
    run = tmp_path / "demo" / "run"
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["steps"] == 2
    cfg = json.loads((run / "summary.json").read_text())["config"]
    assert (cfg["peft"], cfg["optimizer"], cfg["grad_checkpoint"]) == ("lora", "coap", ["backbone", "neck"])
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "merged" / "model.safetensors").is_file()
    assert "activations saved for backward" in (run / "memory.txt").read_text()
