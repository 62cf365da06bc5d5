"""Render labelled scenes: the clean third-person source domain and the egocentric target domain.

A scene is drawn on a square canvas: background, distractors under the objects,
the objects (each also painted with its instance id into a label map, so later
objects and hands occlude earlier ones in both), a few distractors over them,
then hands entering from the lower edge. The camera then warps image and label
map with one inverse map, and photometric effects follow.

Visibility rule: an object is labelled when at least ``min_visibility`` (0.35)
of its full silhouette is visible in the final frame - not covered by a later
object, a distractor or a hand, and not outside what the (warped, rolled) frame
shows - measured in scene pixels; and its box is then the tight box of its
visible pixels in the final image, kept only if both sides are at least
``min_box`` (2) pixels. Partly hidden objects therefore get the box of what can
be seen (as COCO does), and barely visible ones are not labelled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image, ImageDraw

from models.errors import ConfigError
from training.data.synthetic import effects as fx
from training.data.synthetic.background import background
from training.data.synthetic.classes import CLASS_NAMES, CLASSES, distractor, hand
from training.data.synthetic.shapes import Part, transform

DOMAINS = ("source", "egocentric")
MAX_STRENGTH = 2.0
# colours that stay distinguishable for the id rendering used by the tests (objects only; the rest is black)
_ID_PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
               (255, 128, 0), (128, 0, 255), (0, 128, 255), (255, 255, 255), (128, 255, 0), (255, 0, 128)]


@dataclass(frozen=True)
class Effects:
    """Strength of each egocentric effect: 0 turns it off, 1 is the egocentric default, up to 2.

    distortion: wide-angle barrel distortion (k = 0.35 at 1).
    tilt: camera roll, normal with sd 10 degrees at 1 (clipped to 2.5 sd).
    motion_blur: chance 0.6 of a linear blur up to 9 px at 160 px (scaled with the image).
    hands: chance 0.55 of a hand (0.15 of a second one) entering from the lower edge, bigger with strength.
    exposure: log-normal gain (sd 0.45) and a 0.3 chance of low light (gain 0.15-0.45), vignetting.
    noise: sensor read noise (sd 2 + 6) and shot noise, stronger in low light.
    close: chance 0.35 per object of being close to the camera (45-85% of the frame).
    cutoff: chance 0.35 per object of being placed across the frame border.
    jpeg: JPEG re-encoding at quality 95 - 80 * strength * U(0.25, 1).
    """

    distortion: float = 0.0
    tilt: float = 0.0
    motion_blur: float = 0.0
    hands: float = 0.0
    exposure: float = 0.0
    noise: float = 0.0
    close: float = 0.0
    cutoff: float = 0.0
    jpeg: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= MAX_STRENGTH:
                raise ConfigError(f"effect strength {f.name}={v!r} must be a number in [0, {MAX_STRENGTH}] (0 = off, 1 = egocentric default)")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def for_domain(cls, domain: str, **overrides: float) -> Effects:
        """The domain's defaults (source: all 0, egocentric: all 1) with ``overrides`` applied."""
        if domain not in DOMAINS:
            raise ConfigError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise ConfigError(f"unknown effect(s) {', '.join(unknown)}; known effects: {', '.join(cls.names())}")
        base = 1.0 if domain == "egocentric" else 0.0
        values = {name: float(base) for name in cls.names()}
        values.update({k: float(v) for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class SyntheticSample:
    """One rendered frame with its labels (boxes are corner pixels: x0, y0, x1, y1, exclusive ends)."""

    image: np.ndarray  # (S, S, 3) uint8 RGB
    boxes: np.ndarray  # (n, 4) float32
    classes: np.ndarray  # (n,) int64
    labelmap: np.ndarray  # (S, S) uint8: instance id per pixel, 0 = no labelled object
    instance_ids: np.ndarray  # (n,) the labelmap value of each labelled object
    visibility: np.ndarray  # (n,) visible share of each labelled object's silhouette

    def yolo_lines(self) -> list[str]:
        """``class cx cy w h`` lines, normalised to the image size."""
        h, w = self.image.shape[:2]
        lines = []
        for c, (x0, y0, x1, y1) in zip(self.classes, self.boxes):
            lines.append(f"{int(c)} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}")
        return lines


def _rng(seed: int, domain: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), DOMAINS.index(domain), int(index), stream])


def _draw(parts: list[Part], size: float, angle: float, cx: float, cy: float, draws, colors) -> None:
    """Rasterise ``parts`` into each ``ImageDraw`` with its colour (``None`` = the part's own colour)."""
    pts = transform(np.concatenate([p.points for p in parts]), size, angle, cx, cy).tolist()
    start = 0
    for part in parts:
        flat = [tuple(p) for p in pts[start : start + len(part.points)]]
        start += len(part.points)
        for draw, color in zip(draws, colors):
            fill = part.color if color is None else color
            if part.width > 0:
                draw.line(flat, fill=fill, width=max(1, int(round(part.width * size))), joint="curve")
            else:
                draw.polygon(flat, fill=fill)


def _silhouette_area(parts: list[Part], size: float, angle: float) -> tuple[int, np.ndarray]:
    """Pixel count of the whole object (nothing clipped or hidden) and its extent's half sizes."""
    pts = np.concatenate([transform(p.points, size, angle, 0, 0) for p in parts])
    lo, hi = np.floor(pts.min(0)) - 2, np.ceil(pts.max(0)) + 2
    w, h = int(hi[0] - lo[0]) + 1, int(hi[1] - lo[1]) + 1
    local = Image.new("L", (w, h), 0)
    _draw(parts, size, angle, -lo[0], -lo[1], [ImageDraw.Draw(local)], [1])
    return int(np.count_nonzero(np.asarray(local))), (hi - lo) / 2


def _place(rng, half, S, cut, boxes, max_iou):
    """Centre for an object of half extents ``half``: inside the frame, or across a border when ``cut``."""
    best: tuple[float, float, float, np.ndarray] | None = None
    for _ in range(8):
        if cut:
            side = rng.integers(4)
            inside = rng.uniform(0.35, 0.75)  # share of the extent that stays in the frame
            along = rng.uniform(0.15, 0.85) * S
            off = half[side % 2] * (2 * inside - 1)
            pos = [off, along] if side == 0 else [along, off] if side == 1 else [S - off, along] if side == 2 else [along, S - off]
            cx, cy = pos
        else:
            cx = rng.uniform(half[0], S - half[0]) if half[0] < S / 2 else S / 2
            cy = rng.uniform(half[1], S - half[1]) if half[1] < S / 2 else S / 2
        box = np.array([cx - half[0], cy - half[1], cx + half[0], cy + half[1]])
        worst = 0.0
        for b in boxes:
            iw = max(0.0, min(box[2], b[2]) - max(box[0], b[0]))
            ih = max(0.0, min(box[3], b[3]) - max(box[1], b[1]))
            inter = iw * ih
            worst = max(worst, inter / ((box[2] - box[0]) * (box[3] - box[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))
        if best is None or worst < best[0]:
            best = (worst, cx, cy, box)
        if worst <= max_iou:
            break
    assert best is not None  # the loop ran
    return best[1], best[2], best[3]


def render_sample(
    index: int,
    seed: int = 0,
    domain: str = "source",
    imgsz: int = 160,
    effects: Effects | None = None,
    *,
    min_visibility: float = 0.35,
    min_box: int = 2,
    id_colors: bool = False,
) -> SyntheticSample:
    """Render frame ``index`` of the ``(seed, domain)`` stream; the same arguments give the same frame.

    ``id_colors=True`` paints every object in one flat colour of ``_ID_PALETTE`` (by instance
    id) on black, with nearest-neighbour warping and no photometric effects: the geometry
    and occlusion are unchanged, so tests can check boxes against the rendered pixels.
    """
    if domain not in DOMAINS:
        raise ConfigError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    if imgsz < 32:
        raise ConfigError(f"imgsz={imgsz} is too small; use at least 32 pixels")
    eff = effects if effects is not None else Effects.for_domain(domain)
    S = int(imgsz)
    scene = _rng(seed, domain, index, 0)
    names = Effects.names()
    erng = {name: _rng(seed, domain, index, 1 + i) for i, name in enumerate(names)}

    canvas = background(scene, S)  # drawn in id mode too: the scene's random stream must not change
    if id_colors:
        canvas = Image.new("RGB", (S, S), 0)
    labels = Image.new("L", (S, S), 0)
    draw, ldraw = ImageDraw.Draw(canvas), ImageDraw.Draw(labels)
    black = (0, 0, 0) if id_colors else None

    for _ in range(int(scene.integers(2, 6))):  # distractors under the objects
        parts = distractor(scene)
        size, angle = scene.uniform(0.1, 0.35) * S, scene.uniform(0, 360)  # the draw order fixes the frames
        x, y = scene.uniform(0, S, 2)
        _draw(parts, size, angle, x, y, [draw], [black])

    n_obj = int(scene.integers(1, 6 if domain == "source" else 7))
    objects = []  # (class id, full silhouette pixels)
    placed: list[np.ndarray] = []
    for k in range(1, n_obj + 1):
        cls = int(scene.integers(len(CLASS_NAMES)))
        parts = CLASSES[CLASS_NAMES[cls]](scene)
        angle = scene.uniform(-20, 20)
        u_close, u_cut = scene.random(2)
        close = u_close < 0.35 * eff.close
        size = S * (scene.uniform(0.45, 0.85) if close else scene.uniform(0.2, 0.42))
        area, half = _silhouette_area(parts, size, angle)
        cx, cy, box = _place(scene, half, S, u_cut < 0.35 * eff.cutoff, placed, 0.25 if domain == "source" else 0.45)
        placed.append(box)
        _draw(parts, size, angle, cx, cy, [draw, ldraw], [_ID_PALETTE[(k - 1) % len(_ID_PALETTE)] if id_colors else None, k])
        objects.append((cls, area))

    for _ in range(int(scene.integers(0, 3))):  # small distractors over the objects
        parts = distractor(scene)
        size, angle = scene.uniform(0.08, 0.2) * S, scene.uniform(0, 360)
        x, y = scene.uniform(0, S, 2)
        _draw(parts, size, angle, x, y, [draw, ldraw], [black, 0])

    hr = erng["hands"]
    n_hands = int(hr.random() < 0.55 * min(eff.hands, 1.0)) + int(hr.random() < 0.15 * min(eff.hands, 1.0))
    sides = hr.permutation([-1, 1])
    for side in sides[:n_hands]:
        size = S * hr.uniform(0.45, 0.75) * (0.7 + 0.3 * min(eff.hands, 1.5))
        cx = S * (0.5 + side * hr.uniform(0.05, 0.35))
        cy = S - hr.uniform(0.0, 0.3) * size
        angle = -side * hr.uniform(5, 35)
        _draw(hand(hr, int(side)), size, angle, cx, cy, [draw, ldraw], [black, 0])

    dr, tr = erng["distortion"], erng["tilt"]
    k_lens = 0.35 * eff.distortion * dr.uniform(0.85, 1.15)
    tilt = float(np.clip(tr.normal(0, 10 * eff.tilt), -25 * eff.tilt, 25 * eff.tilt)) if eff.tilt > 0 else 0.0
    cam = fx.CameraWarp(S, k_lens, tilt)

    label_arr = np.asarray(labels)
    cover = Image.new("L", (S, S), 0)
    ImageDraw.Draw(cover).polygon(cam.coverage_polygon(), fill=1)
    visible = np.bincount(label_arr[np.asarray(cover, bool)], minlength=n_obj + 1)

    image = cam.warp_image(np.asarray(canvas), nearest=id_colors)
    label_out = cam.warp_labels(label_arr)

    if not id_colors:
        mb = erng["motion_blur"]
        if mb.random() < 0.6 * min(eff.motion_blur, 1.0):
            image = fx.motion_blur(image, mb.uniform(1.5, 9.0) * eff.motion_blur * S / 160, mb.uniform(0, 180))
        er = erng["exposure"]
        gain, gamma, vignette = 1.0, 1.0, 0.0
        if eff.exposure > 0:
            gain = float(np.exp(er.normal(0, 0.45 * eff.exposure)))
            if er.random() < 0.3 * min(eff.exposure, 1.0):
                gain *= er.uniform(0.15, 0.45)
            gamma = float(np.exp(er.normal(0, 0.15 * eff.exposure)))
            vignette = er.uniform(0.1, 0.6) * min(eff.exposure, 1.0)
            image = fx.expose(image, gain, gamma, vignette)
        nr = erng["noise"]
        if eff.noise > 0:
            dark = max(0.0, 1.0 - gain)
            image = fx.sensor_noise(image, nr, (2 + 6 * nr.random()) * eff.noise * (1 + 2 * dark), 0.3 * eff.noise * (1 + dark))
        jr = erng["jpeg"]
        if eff.jpeg > 0:
            image = fx.jpeg(image, int(np.clip(95 - 80 * eff.jpeg * jr.uniform(0.25, 1.0), 5, 95)))

    # tight boxes of each instance's pixels in the final frame
    ys, xs = np.nonzero(label_out)
    ids = label_out[ys, xs].astype(np.int64)
    x0 = np.full(n_obj + 1, S, np.int64)
    y0 = np.full(n_obj + 1, S, np.int64)
    x1 = np.full(n_obj + 1, -1, np.int64)
    y1 = np.full(n_obj + 1, -1, np.int64)
    np.minimum.at(x0, ids, xs)
    np.minimum.at(y0, ids, ys)
    np.maximum.at(x1, ids, xs)
    np.maximum.at(y1, ids, ys)

    boxes, classes, inst, vis = [], [], [], []
    for k, (cls, area) in enumerate(objects, start=1):
        share = visible[k] / max(area, 1)
        bw, bh = x1[k] + 1 - x0[k], y1[k] + 1 - y0[k]
        if share < min_visibility or x1[k] < 0 or bw < min_box or bh < min_box:
            continue
        boxes.append([x0[k], y0[k], x1[k] + 1, y1[k] + 1])
        classes.append(cls)
        inst.append(k)
        vis.append(min(share, 1.0))
    keep = np.isin(label_out, inst) if inst else np.zeros_like(label_out, bool)
    return SyntheticSample(
        image=np.ascontiguousarray(image),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        classes=np.asarray(classes, np.int64),
        labelmap=np.where(keep, label_out, 0).astype(np.uint8),
        instance_ids=np.asarray(inst, np.int64),
        visibility=np.asarray(vis, np.float32),
    )


def render_frame(width: int = 640, height: int = 480, seed: int = 0, domain: str = "egocentric", index: int = 0) -> np.ndarray:
    """One ``height x width x 3`` uint8 RGB frame without labels (e.g. to send to the HTTP service).

    Rendered square at the longer side and centre-cropped to the shorter one.
    """
    side = max(int(width), int(height))
    image = render_sample(index, seed=seed, domain=domain, imgsz=side).image
    top, left = (side - height) // 2, (side - width) // 2
    return np.ascontiguousarray(image[top : top + height, left : left + width])
