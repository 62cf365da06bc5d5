"""Data test helpers: a hand-made YOLO dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from training.data.yolo import write_data_yaml


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
