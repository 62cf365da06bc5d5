"""The camera of the glasses: lens warp, roll, motion blur, exposure, sensor noise, JPEG.

Geometric effects are one inverse map (output pixel -> scene pixel) applied to
the image (bilinear) and to the instance label map (nearest), so boxes taken
from the warped label map are exact for the warped image. Photometric effects
change no geometry.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from models.images import read_rgb


class CameraWarp:
    """Wide-angle barrel distortion of strength ``k`` plus a roll of ``tilt_deg``, for a square ``size`` frame.

    The inverse map is ``r_scene = r_out * (1 + k r_out^2) / (1 + k)`` (radius over
    the half diagonal), so the frame corners stay on the scene corners and the
    centre is magnified; the roll then zooms by ``|cos| + |sin|`` so that no
    output pixel samples outside the scene.
    """

    def __init__(self, size: int, k: float = 0.0, tilt_deg: float = 0.0):
        self.size, self.k, self.tilt_deg = size, float(k), float(tilt_deg)
        self.identity = self.k == 0.0 and self.tilt_deg == 0.0
        c = (size - 1) / 2.0
        v, u = np.mgrid[0:size, 0:size].astype(np.float64)
        self.map_x: np.ndarray
        self.map_y: np.ndarray
        self.map_x, self.map_y = self.inverse(u, v) if not self.identity else (u, v)
        self._c = c
        self._taps: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._nearest: np.ndarray | None = None

    def inverse(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scene coordinates sampled by output pixel centres ``(u, v)``."""
        c = (self.size - 1) / 2.0
        R = self.size / 2.0 * np.sqrt(2.0)
        dx, dy = (u - c) / R, (v - c) / R
        f = (1.0 + self.k * (dx * dx + dy * dy)) / (1.0 + self.k)
        qx, qy = dx * f, dy * f
        a = np.deg2rad(self.tilt_deg)
        cs, sn = np.cos(a), np.sin(a)
        zoom = abs(cs) + abs(sn)
        return c + R * (cs * qx - sn * qy) / zoom, c + R * (sn * qx + cs * qy) / zoom

    def coverage_polygon(self, n: int = 32) -> list[tuple[float, float]]:
        """The outline, in scene pixels, of what the output frame shows (for the visibility rule)."""
        t = np.linspace(-0.5, self.size - 0.5, n)
        lo, hi = np.full(n, -0.5), np.full(n, self.size - 0.5)
        u = np.concatenate([t, hi, t[::-1], lo])
        v = np.concatenate([lo, t, hi, t[::-1]])
        x, y = self.inverse(u, v)
        return list(zip(x.tolist(), y.tolist()))

    def _bilinear_taps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat indices of the four neighbours and the weights of every output pixel (computed once)."""
        if self._taps is None:
            n = self.size
            x = np.clip(self.map_x, 0, n - 1)
            y = np.clip(self.map_y, 0, n - 1)
            x0 = np.minimum(x.astype(np.int64), n - 2)
            y0 = np.minimum(y.astype(np.int64), n - 2)
            wx = (x - x0).astype(np.float32).reshape(-1, 1)
            wy = (y - y0).astype(np.float32).reshape(-1, 1)
            base = (y0 * n + x0).reshape(-1)
            self._taps = (base, wx, wy)
        return self._taps

    def warp_image(self, image: np.ndarray, nearest: bool = False) -> np.ndarray:
        if self.identity:
            return image
        if nearest:
            return self.warp_labels(image)
        n = self.size
        base, wx, wy = self._bilinear_taps()
        flat = image.reshape(-1, image.shape[2])
        a = flat[base].astype(np.float32)
        b = flat[base + 1].astype(np.float32)
        c = flat[base + n].astype(np.float32)
        d = flat[base + n + 1].astype(np.float32)
        top = a + (b - a) * wx
        out = top + (c + (d - c) * wx - top) * wy
        out += 0.5
        return out.clip(0, 255).astype(np.uint8).reshape(image.shape)

    def warp_labels(self, labels: np.ndarray) -> np.ndarray:
        if self.identity:
            return labels
        if self._nearest is None:
            n = self.size
            x = np.clip(np.rint(self.map_x).astype(np.int64), 0, n - 1)
            y = np.clip(np.rint(self.map_y).astype(np.int64), 0, n - 1)
            self._nearest = (y * n + x).reshape(-1)
        flat = labels.reshape(labels.shape[0] * labels.shape[1], -1)
        return flat[self._nearest].reshape(labels.shape)


def motion_blur(image: np.ndarray, length: float, angle_deg: float) -> np.ndarray:
    """Average of the image shifted along a line of ``length`` pixels (a linear motion-blur kernel)."""
    if length < 1.5:
        return image
    a = np.deg2rad(angle_deg)
    t = np.linspace(-length / 2, length / 2, int(np.ceil(length)) + 1)
    offsets = np.unique(np.stack([np.rint(t * np.cos(a)), np.rint(t * np.sin(a))], 1).astype(int), axis=0)
    m = int(np.abs(offsets).max())
    h, w = image.shape[:2]
    padded = np.pad(image.astype(np.float32), ((m, m), (m, m), (0, 0)), mode="edge")
    acc = np.zeros((h, w, image.shape[2]), np.float32)
    for dx, dy in offsets:
        acc += padded[m + dy : m + dy + h, m + dx : m + dx + w]
    return np.clip(acc / len(offsets) + 0.5, 0, 255).astype(np.uint8)


def expose(image: np.ndarray, gain: float, gamma: float = 1.0, vignette: float = 0.0) -> np.ndarray:
    """Exposure gain, gamma and radial vignetting, on linear-ish [0, 1] values."""
    img = image.astype(np.float32) / 255.0
    if vignette > 0:
        h, w = img.shape[:2]
        yy, xx = np.ogrid[0:h, 0:w]
        r2 = ((xx - (w - 1) / 2) / (w / 2)) ** 2 + ((yy - (h - 1) / 2) / (h / 2)) ** 2
        img = img * (1 - vignette * r2 / 2)[..., None]
    img = np.clip(img * gain, 0, 1) ** gamma
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def sensor_noise(image: np.ndarray, rng: np.random.Generator, read_sigma: float, shot: float) -> np.ndarray:
    """Gaussian read noise plus signal-dependent shot noise (in 8-bit units), a little colour noise."""
    img = image.astype(np.float32)
    sigma = read_sigma + shot * np.sqrt(img)
    noise = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    return np.clip(img + noise + 0.5, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode as JPEG at ``quality`` (blocking and ringing artefacts)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return read_rgb(buf)
