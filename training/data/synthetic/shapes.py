"""Polygon primitives and colours for the procedural drawings.

Every drawing is a list of :class:`Part` in a local frame centred on the object
(longest side about 1). Parts are polygons (or thick polylines) so that scaling,
rotating and placing an object is a matrix product on its points, and the same
points are rasterised into the image and into the instance label map.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

RGB = tuple[int, int, int]


@dataclass
class Part:
    """One filled polygon (``width == 0``) or a polyline of ``width`` local units."""

    points: np.ndarray  # (k, 2) local x, y
    color: RGB
    width: float = 0.0


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 20) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def arc(cx: float, cy: float, rx: float, ry: float, t0: float, t1: float, n: int = 10) -> np.ndarray:
    t = np.linspace(t0, t1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def rounded_rect(x0: float, y0: float, x1: float, y1: float, r: float, n: int = 4) -> np.ndarray:
    r = min(r, (x1 - x0) / 2, (y1 - y0) / 2)
    if r <= 0:
        return rect(x0, y0, x1, y1)
    corners = [(x1 - r, y0 + r, -np.pi / 2, 0), (x1 - r, y1 - r, 0, np.pi / 2),
               (x0 + r, y1 - r, np.pi / 2, np.pi), (x0 + r, y0 + r, np.pi, 1.5 * np.pi)]
    return np.concatenate([arc(cx, cy, r, r, a, b, n) for cx, cy, a, b in corners])


def quad(x0: float, y0: float, w0: float, y1: float, w1: float) -> np.ndarray:
    """A trapezoid centred on ``x0``: width ``w0`` at ``y0``, ``w1`` at ``y1``."""
    return np.array([[x0 - w0 / 2, y0], [x0 + w0 / 2, y0], [x0 + w1 / 2, y1], [x0 - w1 / 2, y1]])


def hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))
    return int(r * 255), int(g * 255), int(b * 255)


def random_color(rng: np.random.Generator, s: tuple[float, float] = (0.4, 1.0), v: tuple[float, float] = (0.4, 1.0)) -> RGB:
    return hsv(rng.random(), rng.uniform(*s), rng.uniform(*v))


def shade(color: RGB, factor: float) -> RGB:
    """Darker (< 1) or lighter (> 1) version of ``color``."""
    if factor <= 1:
        return tuple(int(c * factor) for c in color)  # type: ignore[return-value]
    return tuple(int(c + (255 - c) * min(factor - 1, 1)) for c in color)  # type: ignore[return-value]


def transform(points: np.ndarray, scale: float, angle_deg: float, cx: float, cy: float) -> np.ndarray:
    """Scale, rotate (degrees, counter-clockwise on screen) and translate local points to pixels."""
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    rot = np.array([[c, s], [-s, c]]) * scale
    return points @ rot + (cx, cy)
