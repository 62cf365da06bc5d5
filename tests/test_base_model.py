"""The shipped base model: loads, matches its card, and still scores what the card says on fresh data."""

from __future__ import annotations

import json

import pytest

from models.registry import BASE_MODEL_DIR, load_base_model

MARGIN = 0.1  # a fresh 60-frame set scatters around the card's 200-frame figure


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((BASE_MODEL_DIR / "card.json").read_text())


def test_card_records_how_the_model_was_made(card):
    assert card["command"].startswith("python benchmarks/train_base.py")
    assert isinstance(card["seed"], int)
    for key in ("source_val_map50", "source_val_map50_95", "egocentric_val_map50_95_zero_shot"):
        assert 0.0 <= card["metrics"][key] <= 1.0, key
    assert card["metrics"]["source_val_map50_95"] > card["metrics"]["egocentric_val_map50_95_zero_shot"]
    assert (BASE_MODEL_DIR / "model.safetensors").stat().st_size <= 12 * 2**20


def test_base_model_matches_its_card_on_a_fresh_source_set(card, tmp_path):
    from training.data.synthetic import CLASS_NAMES, generate_dataset
    from training.evaluate import evaluate

    model = load_base_model()
    assert [model.names[i] for i in range(model.nc)] == list(CLASS_NAMES) == card["classes"]
    assert model.imgsz == card["imgsz"]
    data = generate_dataset(tmp_path / "fresh", "source", n=80, imgsz=card["imgsz"], seed=12345, val_fraction=0.75)
    metrics = evaluate(model, data, split="val", imgsz=card["imgsz"], batch=32)
    assert metrics["images"] == 60
    assert metrics["map50"] >= card["metrics"]["source_val_map50"] - MARGIN, metrics["map50"]
