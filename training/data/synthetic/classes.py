"""The object classes a glasses assistant cares about, drawn procedurally.

Each class has one drawing function ``f(rng) -> list[Part]`` with a silhouette and
inner structure that tell it apart (a mug's rim and handle, a bottle's neck and
cap, a phone's screen, a book's spine and pages, a keyboard's key grid, a food
label's black text bars), and random size ratios, colours and details for
variation within the class. Distractors are things on a table that are none of
these (leaves, pens, plates, blobs, plain paper, cables).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from training.data.synthetic.shapes import Part, arc, ellipse, hsv, quad, random_color, rect, rounded_rect, shade

SKIN_TONES = [(255, 219, 172), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 56, 30)]


def cup(rng: np.random.Generator) -> list[Part]:
    body = random_color(rng, (0.3, 1.0), (0.5, 1.0)) if rng.random() < 0.8 else (235, 235, 230)
    w, h = rng.uniform(0.45, 0.65), 0.9
    taper = rng.uniform(0.75, 1.0)
    top, bot = -h / 2, h / 2
    x = -0.1
    parts = [Part(quad(x, top, w, bot, w * taper), body)]
    if rng.random() < 0.6:  # a band or stripe of a second colour
        y0 = rng.uniform(top + 0.15, bot - 0.3)
        y1 = y0 + rng.uniform(0.08, 0.2)
        f0, f1 = (y0 - top) / h, (y1 - top) / h
        parts.append(Part(quad(x, y0, w * (1 - (1 - taper) * f0), y1, w * (1 - (1 - taper) * f1)), random_color(rng)))
    rim_ry = rng.uniform(0.05, 0.09)
    parts.append(Part(ellipse(x, top, w / 2, rim_ry), shade(body, 0.75)))
    drink = [(70, 40, 20), (120, 80, 50), (30, 20, 10), (200, 170, 120)][rng.integers(4)]
    parts.append(Part(ellipse(x, top + 0.01, w / 2 * 0.85, rim_ry * 0.7), drink))
    hx = x + w * (1 + taper) / 4
    ry = rng.uniform(0.18, 0.26)
    parts.append(Part(arc(hx, -0.02, rng.uniform(0.14, 0.2), ry, -np.pi / 2, np.pi / 2), shade(body, 0.85), width=0.07))
    return parts


def bottle(rng: np.random.Generator) -> list[Part]:
    glass = [(40, 120, 60), (60, 90, 160), (120, 70, 30), (200, 220, 230), (220, 60, 50)][rng.integers(5)]
    w = rng.uniform(0.26, 0.38)
    neck = w * rng.uniform(0.28, 0.4)
    shoulder_y, neck_y, cap_y = rng.uniform(-0.2, -0.05), rng.uniform(-0.36, -0.3), -0.42
    parts = [
        Part(rounded_rect(-w / 2, shoulder_y, w / 2, 0.5, w * 0.15), glass),
        Part(quad(0, neck_y, neck, shoulder_y + 0.01, w), glass),
        Part(rect(-neck / 2, cap_y, neck / 2, neck_y + 0.01), glass),
        Part(rect(-neck / 2 * 1.15, -0.5, neck / 2 * 1.15, cap_y), random_color(rng, (0.6, 1.0), (0.5, 1.0))),
    ]
    y0 = rng.uniform(0.0, 0.15)
    parts.append(Part(rect(-w / 2, y0, w / 2, y0 + rng.uniform(0.15, 0.28)), random_color(rng, (0.0, 0.6), (0.8, 1.0))))
    parts.append(Part(rect(-w / 2 + w * 0.15, shoulder_y + 0.05, -w / 2 + w * 0.25, 0.45), shade(glass, 1.5)))
    return parts


def phone(rng: np.random.Generator) -> list[Part]:
    frame = [(20, 20, 22), (200, 200, 205), (240, 240, 240), (60, 60, 80), (180, 150, 120)][rng.integers(5)]
    w = rng.uniform(0.45, 0.55)
    bezel = rng.uniform(0.025, 0.05)
    parts = [Part(rounded_rect(-w / 2, -0.5, w / 2, 0.5, 0.08), frame)]
    sx0, sy0, sx1, sy1 = -w / 2 + bezel, -0.5 + bezel * 1.6, w / 2 - bezel, 0.5 - bezel * 1.6
    on = rng.random() < 0.7
    screen = hsv(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.6, 1.0)) if on else (10, 10, 14)
    parts.append(Part(rounded_rect(sx0, sy0, sx1, sy1, 0.04), screen))
    if on:  # an app grid
        cols, rows = 4, int(rng.integers(4, 6))
        cw, ch = (sx1 - sx0) / cols, (sy1 - sy0) * 0.7 / rows
        for r in range(rows):
            for c in range(cols):
                x0, y0 = sx0 + c * cw + cw * 0.2, sy0 + 0.08 + r * ch + ch * 0.2
                parts.append(Part(rect(x0, y0, x0 + cw * 0.6, y0 + ch * 0.6), random_color(rng, (0.5, 1.0), (0.6, 1.0))))
    parts.append(Part(ellipse(0, -0.5 + bezel * 0.8, 0.02, 0.012, 8), (5, 5, 5)))
    return parts


def book(rng: np.random.Generator) -> list[Part]:
    cover = random_color(rng, (0.4, 1.0), (0.3, 0.9))
    w = rng.uniform(0.62, 0.8)
    x0, x1 = -w / 2, w / 2
    spine = rng.uniform(0.06, 0.11)
    parts = [
        Part(rect(x0, -0.5, x1, 0.5), cover),
        Part(rect(x0, -0.5, x0 + spine, 0.5), shade(cover, 0.6)),
        Part(rect(x1 - 0.04, -0.49, x1, 0.49), (240, 235, 215)),
    ]
    for y in np.linspace(-0.45, 0.45, 5):
        parts.append(Part(np.array([[x1 - 0.04, y], [x1, y]]), (180, 175, 160), width=0.008))
    title_y = rng.uniform(-0.4, -0.15)
    parts.append(Part(rect(x0 + spine + 0.06, title_y, x1 - 0.1, title_y + rng.uniform(0.1, 0.18)), random_color(rng, (0.0, 0.3), (0.85, 1.0))))
    if rng.random() < 0.6:
        parts.append(Part(ellipse(0.02, 0.18, 0.15, 0.15, 14), random_color(rng)))
    parts.append(Part(rect(x0 + spine + 0.1, 0.36, x1 - 0.2, 0.41), shade(cover, 1.6)))
    return parts


def keyboard(rng: np.random.Generator) -> list[Part]:
    base = [(30, 30, 32), (210, 210, 212), (245, 245, 245), (90, 90, 100)][rng.integers(4)]
    key = shade(base, 1.5) if sum(base) < 300 else shade(base, 0.7)
    h = rng.uniform(0.28, 0.38)
    parts = [Part(rounded_rect(-0.5, -h / 2, 0.5, h / 2, 0.03), base)]
    rows, cols = 4, int(rng.integers(11, 15))
    pad = 0.025
    kw, kh = (1 - 2 * pad) / cols, (h - 2 * pad) / (rows + 1)
    for r in range(rows):
        for c in range(cols):
            x0, y0 = -0.5 + pad + c * kw, -h / 2 + pad + r * kh
            parts.append(Part(rect(x0 + kw * 0.12, y0 + kh * 0.12, x0 + kw * 0.88, y0 + kh * 0.88), key))
    y0 = -h / 2 + pad + rows * kh
    parts.append(Part(rect(-0.5 + pad + 3 * kw, y0 + kh * 0.12, -0.5 + pad + (cols - 3) * kw, y0 + kh * 0.88), key))
    return parts


def food_label(rng: np.random.Generator) -> list[Part]:
    paper = [(250, 250, 248), (245, 240, 225), (255, 255, 255)][rng.integers(3)]
    ink = (15, 15, 15)
    w = rng.uniform(0.5, 0.7)
    x0, x1 = -w / 2, w / 2
    parts = [Part(rect(x0, -0.5, x1, 0.5), ink), Part(rect(x0 + 0.02, -0.48, x1 - 0.02, 0.48), paper)]
    parts.append(Part(rect(x0 + 0.05, -0.45, x1 - rng.uniform(0.05, 0.2), -0.35), ink))  # "Nutrition Facts"
    y = -0.3
    thick_at = {int(rng.integers(1, 3)), int(rng.integers(5, 8))}
    for i in range(int(rng.integers(8, 12))):
        if y > 0.42:
            break
        if i in thick_at:
            parts.append(Part(rect(x0 + 0.04, y, x1 - 0.04, y + 0.035), ink))
            y += 0.06
            continue
        parts.append(Part(rect(x0 + 0.05, y, x0 + 0.05 + rng.uniform(0.15, w - 0.25), y + 0.025), (60, 60, 60)))
        parts.append(Part(rect(x1 - 0.05 - rng.uniform(0.04, 0.09), y, x1 - 0.05, y + 0.025), (60, 60, 60)))
        parts.append(Part(np.array([[x0 + 0.04, y + 0.045], [x1 - 0.04, y + 0.045]]), (90, 90, 90), width=0.006))
        y += 0.07
    return parts


CLASSES: dict[str, Callable[[np.random.Generator], list[Part]]] = {
    "cup": cup,
    "bottle": bottle,
    "phone": phone,
    "book": book,
    "keyboard": keyboard,
    "food_label": food_label,
}
CLASS_NAMES: list[str] = list(CLASSES)


def distractor(rng: np.random.Generator) -> list[Part]:
    """Something on a table that is not one of the classes."""
    kind = int(rng.integers(6))
    if kind == 0:  # a sprig of leaves
        green = hsv(rng.uniform(0.22, 0.38), rng.uniform(0.5, 0.9), rng.uniform(0.3, 0.7))
        parts = [Part(np.array([[0, 0.5], [0, -0.3]]), shade(green, 0.6), width=0.03)]
        for y in np.linspace(-0.35, 0.35, int(rng.integers(3, 6))):
            side = rng.choice([-1, 1])
            parts.append(Part(ellipse(side * 0.14, y, 0.15, 0.06, 12), green))
        return parts
    if kind == 1:  # a pen
        return [Part(rect(-0.03, -0.5, 0.03, 0.5), random_color(rng)), Part(quad(0, 0.5, 0.06, 0.58, 0.0), (40, 40, 40))]
    if kind == 2:  # a plate seen from above
        c = random_color(rng, (0.0, 0.3), (0.7, 1.0))
        return [Part(ellipse(0, 0, 0.5, 0.5, 24), shade(c, 0.85)), Part(ellipse(0, 0, 0.36, 0.36, 24), c)]
    if kind == 3:  # a blob
        n = int(rng.integers(5, 9))
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(0.25, 0.5, n)
        return [Part(np.stack([r * np.cos(t), r * np.sin(t)], 1), random_color(rng, (0.2, 0.8), (0.3, 0.9)))]
    if kind == 4:  # plain paper, perhaps with faint ruling
        paper = random_color(rng, (0.0, 0.15), (0.85, 1.0))
        parts = [Part(rect(-0.35, -0.5, 0.35, 0.5), paper)]
        if rng.random() < 0.5:
            for y in np.linspace(-0.4, 0.4, 6):
                parts.append(Part(np.array([[-0.3, y], [0.3, y]]), shade(paper, 0.85), width=0.01))
        return parts
    pts = np.cumsum(rng.normal(0, 0.2, (6, 2)), 0)  # a cable
    pts = (pts - pts.mean(0)) / max(np.abs(pts).max(), 1e-6) * 0.5
    return [Part(pts, random_color(rng, (0.0, 0.4), (0.1, 0.9)), width=0.04)]


def hand(rng: np.random.Generator, side: int) -> list[Part]:
    """A hand with four fingers and a thumb, wrist at the bottom; ``side`` -1 left, +1 right."""
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))]
    skin = shade(skin, rng.uniform(0.85, 1.1))
    parts = [Part(quad(0, 0.25, 0.34, 0.7, 0.3), shade(skin, 0.95))]  # forearm, leaving the frame
    parts.append(Part(ellipse(0, 0.05, 0.21, 0.24, 16), skin))  # palm
    spread = rng.uniform(0.0, 0.35)
    curl = rng.uniform(0.55, 1.0)
    for i, (base_x, length) in enumerate([(-0.13, 0.3), (-0.045, 0.36), (0.045, 0.34), (0.13, 0.26)]):
        ang = (i - 1.5) * spread / 1.5
        L = length * curl
        tip = np.array([base_x + np.sin(ang) * L, -0.12 - np.cos(ang) * L])
        parts.append(Part(np.array([[base_x, -0.1], tip]), skin, width=0.075))
        parts.append(Part(ellipse(tip[0], tip[1], 0.037, 0.037, 8), skin))
        parts.append(Part(ellipse(tip[0], tip[1] + 0.012, 0.022, 0.018, 6), shade(skin, 1.25)))  # nail
    thumb_tip = np.array([-side * rng.uniform(0.32, 0.4), rng.uniform(-0.15, 0.05)])
    parts.append(Part(np.array([[-side * 0.12, 0.15], thumb_tip]), shade(skin, 0.97), width=0.085))
    parts.append(Part(ellipse(thumb_tip[0], thumb_tip[1], 0.042, 0.042, 8), shade(skin, 0.97)))
    return parts
