"""Small generated datasets for the data tests (import the fixtures into a test module to use them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.synthetic import generate_dataset
from training.data.yolo import write_data_yaml


@pytest.fixture(scope="session")
def source_yaml(tmp_path_factory) -> Path:
    """A 12-image source-domain YOLO dataset at 96 px (10 train, 2 val)."""
    return generate_dataset(tmp_path_factory.mktemp("synth") / "source", "source", n=12, imgsz=96, seed=3, val_fraction=0.2)


@pytest.fixture(scope="session")
def ego_yaml(tmp_path_factory) -> Path:
    """A 10-image egocentric YOLO dataset at 96 px."""
    return generate_dataset(tmp_path_factory.mktemp("synth") / "ego", "egocentric", n=10, imgsz=96, seed=4, val_fraction=0.2)


def make_yolo_dataset(root: Path, labels: dict[str, str], names=("a", "b", "c"), size=(60, 100), split="train") -> Path:
    """A hand-made YOLO dataset: one PNG of ``size`` (h, w) per entry of ``labels`` (stem -> label text)."""
    rng = np.random.default_rng(0)
    for stem, text in labels.items():
        img = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / split / f"{stem}.png")
        if text is not None:
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{stem}.txt").write_text(text)
    return write_data_yaml(root / "data.yaml", root=root, train=f"images/{split}", val=f"images/{split}", names=list(names))
