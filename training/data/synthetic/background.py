"""Cluttered indoor backgrounds: a wall and a table surface with texture and low-contrast clutter."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from training.data.synthetic.shapes import random_color, shade


def background(rng: np.random.Generator, size: int) -> Image.Image:
    """A wall above a table, smooth lighting variation, optional wood grain and clutter shapes."""
    horizon = rng.uniform(0.2, 0.65) * size
    wall = np.array(random_color(rng, (0.0, 0.35), (0.45, 0.95)), np.float32)
    table = np.array(random_color(rng, (0.1, 0.6), (0.25, 0.8)), np.float32)
    yy = np.arange(size, dtype=np.float32)[:, None, None]
    img = np.where(yy < horizon, wall, table) * np.ones((1, size, 1), np.float32)
    low = rng.random((5, 5, 3)).astype(np.float32) * 255
    light = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255.0
    img *= 0.75 + 0.5 * light.mean(2, keepdims=True) + 0.1 * (light - 0.5)
    if rng.random() < 0.5:  # wood grain / tiles on the table
        freq, phase = rng.uniform(0.15, 0.6), rng.uniform(0, 6.3)
        xx = np.arange(size, dtype=np.float32)
        grain = 1 + 0.08 * np.sin(xx * freq + phase + 2 * np.sin(yy[:, :, 0] * 0.05))
        img = np.where(yy < horizon, img, img * grain[..., None])
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 9))):  # shelves, frames, sockets, stains, shadows
        x0, y0 = rng.uniform(-0.1, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.4, 2) * size
        base = wall if y0 < horizon else table
        col = shade((int(base[0]), int(base[1]), int(base[2])), rng.uniform(0.6, 1.4)) if rng.random() < 0.7 else random_color(rng, (0.0, 0.5), (0.2, 0.8))
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
        else:
            draw.line([x0, y0, x0 + w, y0 + rng.uniform(-0.2, 0.2) * size], fill=col, width=int(rng.integers(1, 4)))
    return canvas
