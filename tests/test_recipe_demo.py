"""The demo's pipeline on a few frames: base before -> full FT + COAP + checkpointing -> after, outputs under --out."""

from __future__ import annotations

import json

import pytest

from service.commands import demo
from service.commands.demo import run_demo


def test_demo_pipeline_small(tmp_path):
    s = run_demo(tmp_path / "demo", frames=24, val_frames=8, steps=2, batch=4, export=True, quiet=True)
    assert s["frames"] == {"train": 16, "val": 8, "imgsz": 128}
    assert s["steps"] == 2 and s["trainable_percent"] > 99
    # the adapted model's score is the merged model's score on the same val split
    from models.detection import DetectionModel
    from training.evaluate import evaluate

    merged = DetectionModel.load(tmp_path / "demo" / "run" / "merged")
    again = evaluate(merged, tmp_path / "demo" / "data" / "data.yaml", split="val", imgsz=128, batch=32)
    assert s["map50_95_after"] == pytest.approx(again["map50_95"], abs=1e-4)
    # exact bytes: COAP's projected moments + checkpointing need far less than full fine-tuning with AdamW
    assert 0 < s["training_bytes"] < 0.6 * s["full_fine_tuning_bytes"]
    assert s["memory_ratio_to_full_ft"] == pytest.approx(s["training_bytes"] / s["full_fine_tuning_bytes"], abs=1e-3)
    assert s["gap_closed"] is None  # 24 frames are not the benchmark's val set: no ceiling applies
    run = tmp_path / "demo" / "run"
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["steps"] == 2
    cfg = json.loads((run / "summary.json").read_text())["config"]
    assert (cfg["peft"], cfg["optimizer"]) == ("none", "coap") and cfg["grad_checkpoint"] == demo.SETUP["grad_checkpoint"]
    assert (run / "merged" / "model.safetensors").is_file()
    assert "activations saved for backward" in (run / "memory.txt").read_text()
    assert s["export"]["verified"] and (run / "model.onnx").is_file()
    from PIL import Image

    picture = Image.open(s["before_after"])  # 4 val frames: base on top, adapted below, drawn at 2x
    assert picture.size == (2 * (4 * (128 + 6) - 6), 2 * (2 * 128 + 6))


def test_gap_closed_uses_the_ceiling_only_on_the_benchmark_val_set(monkeypatch, tmp_path):
    from models import registry

    card = {"egocentric_ceiling": {"map50_95": 0.4, "data_seed": demo.DATA_SEED, "frames": demo.FRAMES,
                                   "val_frames": demo.VAL_FRAMES, "imgsz": 128}}
    (tmp_path / "card.json").write_text(json.dumps(card))
    monkeypatch.setattr(registry, "BASE_MODEL_DIR", tmp_path)
    assert demo.ceiling_for(demo.FRAMES, demo.VAL_FRAMES, 128) == 0.4
    assert demo.ceiling_for(120, demo.VAL_FRAMES, 128) is None
    assert demo.ceiling_for(demo.FRAMES, demo.VAL_FRAMES, 160) is None
