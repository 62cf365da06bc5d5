"""Draw detections on a frame: one function for ``predict``, the HTTP service and the demo.

NumPy and Pillow only (no torch, no OpenCV, no font download): it ships beside
``export.runtime`` on the glasses. The label font is Pillow's built-in default
font (a scalable TrueType face embedded in Pillow when FreeType is available,
else its bitmap font).

Readable on any background: each box is its class colour with a dark edge on
both sides, and each label is text in black or white (whichever contrasts more
with the class colour) on a filled patch of that colour.

    >>> from export.draw import draw_detections
    >>> image = draw_detections(frame, detector.detect(frame))   # a new PIL image; ``frame`` is untouched
    >>> image.save("frame.boxes.jpg")
"""

from __future__ import annotations

import colorsys
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: The edge drawn on both sides of every box line, so a light box stays visible on a light frame.
EDGE = (0, 0, 0)


def class_color(class_id: int) -> tuple[int, int, int]:
    """A saturated RGB colour per class id, stable across runs; neighbouring ids get distant hues."""
    hue = (int(class_id) * 0.618033988749895 + 0.05) % 1.0
    value = 1.0 if int(class_id) % 2 == 0 else 0.8
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _luminance(color: Sequence[int]) -> float:
    """WCAG relative luminance of an sRGB colour (0 black .. 1 white)."""
    def channel(c: float) -> float:
        c = c / 255.0
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(float(c)) for c in color[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_color(background: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever has the higher WCAG contrast ratio against ``background``."""
    lum = _luminance(background)
    on_black = (lum + 0.05) / 0.05
    on_white = 1.05 / (lum + 0.05)
    return (0, 0, 0) if on_black >= on_white else (255, 255, 255)


@lru_cache(maxsize=16)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed-size bitmap font
        return ImageFont.load_default()


def _items(detections: Any, names: Sequence[str] | Mapping[int, str] | None) -> list[tuple[tuple[float, ...], float | None, int, str]]:
    """``(box, score, class_id, label name)`` from Detection objects, dicts, or a ``(boxes, scores, class_ids)`` triple."""
    def name_of(cid: int, given: Any = None) -> str:
        if given:
            return str(given)
        if names is not None:
            try:
                return str(names[cid])
            except (IndexError, KeyError):
                pass
        return str(cid)

    if isinstance(detections, tuple) and len(detections) == 3 and all(hasattr(a, "__len__") for a in detections) \
            and len(np.asarray(detections[0]).shape) == 2:
        boxes, scores, classes = (np.asarray(a) for a in detections)
        return [(tuple(float(v) for v in b[:4]), float(s), int(c), name_of(int(c))) for b, s, c in zip(boxes, scores, classes)]
    out = []
    for d in detections or ():
        get = d.get if isinstance(d, Mapping) else (lambda key, default=None, _d=d: getattr(_d, key, default))
        box = get("box")
        if box is None or len(box) < 4:
            raise ValueError(f"a detection needs a box (x1, y1, x2, y2), got {d!r}")
        cid = int(get("class_id", 0) or 0)
        score = get("score")
        out.append((tuple(float(v) for v in list(box)[:4]), None if score is None else float(score), cid,
                    name_of(cid, get("class_name"))))
    return out


def draw_detections(
    image: Any,
    detections: Any,
    names: Sequence[str] | Mapping[int, str] | None = None,
    line_width: int | None = None,
    font_size: int | None = None,
    show_score: bool = True,
) -> Image.Image:
    """The frame with each detection's box, class name and score drawn on it (a new RGB PIL image).

    Args:
        image: an RGB HWC uint8 array (gray accepted) or a PIL image; it is not modified.
        detections: ``export.runtime.Detection`` objects, dicts with ``box`` / ``score`` / ``class_id`` /
            ``class_name`` (the JSON the service and ``predict`` write), or a ``(boxes, scores, class_ids)``
            triple of arrays as ``models.processing.postprocess`` returns; boxes are ``x1, y1, x2, y2`` in the
            frame's pixels.
        names: class names by id, for detections without a ``class_name``.
        line_width: box line width in pixels (default: scales with the frame, at least 2).
        font_size: label height in pixels (default: scales with the frame, at least 10).
        show_score: append the score to the class name.
    """
    if isinstance(image, Image.Image):
        canvas = image.convert("RGB")  # a copy, also for an RGB image
    else:
        array = np.asarray(image)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ValueError(f"expected an HxWx3 RGB image, got an array of shape {array.shape}")
        canvas = Image.fromarray(np.ascontiguousarray(array[:, :, :3]).astype(np.uint8, copy=False), "RGB")
    width, height = canvas.size
    items = _items(detections, names)
    if not items:
        return canvas
    lw = int(line_width) if line_width else max(2, round((width + height) * 0.002))
    fs = int(font_size) if font_size else max(10, round(max(width, height) * 0.022))
    font = _font(fs)
    draw = ImageDraw.Draw(canvas)
    # Boxes first, labels on top, so a label is never crossed by another box's line.
    for (x1, y1, x2, y2), _, cid, _ in items:
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        color = class_color(cid)
        draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=EDGE, width=lw + 2)  # 1 px edge outside and inside
        draw.rectangle((x1, y1, x2, y2), outline=color, width=lw)
    pad = max(1, fs // 6)
    for (x1, y1, x2, y2), score, cid, name in items:
        x1, y1 = min(x1, x2), min(y1, y2)
        label = f"{name} {score:.2f}" if show_score and score is not None else name
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        lx = min(max(0.0, x1), max(0.0, width - tw))
        ly = y1 - th if y1 - th >= 0 else min(max(0.0, y1), max(0.0, height - th))  # above the box, else inside it
        color = class_color(cid)
        draw.rectangle((lx, ly, lx + tw, ly + th), fill=color)
        draw.text((lx + pad - left, ly + pad - top), label, fill=text_color(color), font=font)
    return canvas


def draw_array(image: Any, detections: Any, **kwargs: Any) -> np.ndarray:
    """:func:`draw_detections` returning an RGB HWC uint8 array (for video writers and encoders)."""
    return np.asarray(draw_detections(image, detections, **kwargs))


__all__ = ["class_color", "draw_array", "draw_detections", "text_color"]
