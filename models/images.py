"""Opening and decoding image files: Pillow's own ``Image.open``, EXIF orientation applied.

Importing ultralytics replaces ``PIL.Image.open`` with a wrapper that, for a file
Pillow cannot identify, calls ``check_requirements("pi-heif")`` - a pip install
when online, a ``ModuleNotFoundError`` offline. A corrupt upload or dataset file
must become one of our clear errors, never an install, so every place that opens
images goes through :func:`pil_open`. Pillow is imported lazily: the exported
runtime works without it when given arrays.

Frames come out as shown: a file's EXIF Orientation (a phone or glasses JPEG stored
sideways) is applied with Pillow's ``ImageOps.exif_transpose``, as browsers,
``cv2.imread`` and so ultralytics' training, validation and prediction do; YOLO labels
are in that upright frame.
"""

from __future__ import annotations

import sys
from typing import Any


def pil_open(fp: Any, formats: tuple[str, ...] | None = None):
    """``PIL.Image.open(fp, formats=formats)``, bypassing ultralytics' wrapper if it is installed."""
    from PIL import Image

    opener = Image.open
    if getattr(opener, "__module__", "PIL.Image") != "PIL.Image":
        opener = getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", opener)
    return opener(fp, formats=formats) if formats is not None else opener(fp)


#: Orientation values whose transpose swaps width and height (5 transpose, 6 and 8 quarter turns, 7 transverse).
QUARTER_TURNS = frozenset({5, 6, 7, 8})
_ORIENTATION = 0x0112


def exif_orientation(img) -> int:
    """The EXIF Orientation (2-8) that :func:`upright` applies to ``img``; 1 when absent, out of range or unreadable.

    Before ``load()`` this reads the header, except that Pillow decodes a PNG without an EXIF chunk ahead of
    its pixels to look for one after them. An EXIF block Pillow cannot parse counts as none (the frame as stored).
    """
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - metadata only (no pixels are decoded here); Pillow warns on most damage
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def upright_size(img) -> tuple[int, int]:
    """``(width, height)`` of an opened ``img`` as :func:`read_rgb` decodes it (EXIF orientation applied)."""
    width, height = img.size
    if exif_orientation(img) not in QUARTER_TURNS:
        return width, height
    if img.format == "TIFF" and (width, height) == (img.tag_v2.get(257), img.tag_v2.get(256)):
        return width, height  # Pillow reports (and loads) this TIFF turned already: its load() applies the tag
    return height, width


def upright(img):
    """``img`` as shown: a new image turned by its EXIF orientation (``ImageOps.exif_transpose``), else ``img``.

    ``img`` is not changed. A block Pillow reads but cannot write back without the tag (a malformed entry of another
    tag) is dropped: the frame is turned from the orientation alone, so it always matches :func:`upright_size`.
    """
    from PIL import Image, ImageOps

    orientation = exif_orientation(img)
    if orientation == 1:
        return img  # no copy: most frames
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - re-writing a malformed entry raises AttributeError, ValueError, struct.error ...
        # a decode or memory error, not the metadata, is raised again by the copy below
        only_orientation = Image.Exif()
        only_orientation[_ORIENTATION] = orientation
        bare = img.copy()
        bare.info = {"exif": only_orientation.tobytes()}
        return ImageOps.exif_transpose(bare)


#: bytes Pillow holds per pixel in each mode (RGB is stored in 4 bytes); unknown modes count as 4.
MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 4, "PA": 4, "La": 4, "RGB": 4, "RGBA": 4, "RGBa": 4, "RGBX": 4,
              "CMYK": 4, "YCbCr": 4, "LAB": 4, "HSV": 4, "I": 4, "F": 4, "I;16": 2, "I;16L": 2, "I;16B": 2,
              "I;16N": 2}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _scale_to_uint8(arr, full_scale: float):
    """``arr`` (integers or floats, gray) -> uint8 with ``full_scale`` mapped to 255, rounded, clipped."""
    import numpy as np

    arr = np.nan_to_num(np.asarray(arr, dtype=np.float32), nan=0.0, posinf=full_scale, neginf=0.0)
    if full_scale != 255.0:
        arr *= np.float32(255.0 / full_scale)
    return np.clip(arr + np.float32(0.5), 0, 255).astype(np.uint8)


def to_rgb8(img):
    """A PIL image in any mode -> an HxWx3 uint8 RGB array.

    16-bit images (``I;16*``, and ``I`` holding 16-bit values, as 16-bit PNG and TIFF open) are scaled
    from 0..65535, float images (``F``) from 0..1 (or 0..255 / 0..65535 when their values are that large),
    instead of being clipped at 255 as ``convert("RGB")`` does. Alpha is dropped; palette, gray, CMYK and
    YCbCr are converted by Pillow.
    """
    import numpy as np

    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        arr = np.asarray(img)
        if img.mode in _SIXTEEN_BIT:
            full = 65535.0
        else:
            top = float(np.nanmax(arr)) if arr.size else 0.0
            if img.mode == "F" and top <= 1.0:
                full = 1.0
            elif top <= 255.0:
                full = 255.0
            elif top <= 65535.0:
                full = 65535.0
            else:
                full = top
        gray = _scale_to_uint8(arr, full)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def read_rgb(fp: Any):
    """An image file (a path or a binary file object) -> HxWx3 uint8 RGB as shown (EXIF orientation applied).

    The one decoder of image files for datasets, the runtime and HTTP (which adds limits and reduction
    around the same conversion), so a frame gives the same pixels in training and in inference. Pillow's
    errors (``UnidentifiedImageError``, ``OSError`` ...) reach the caller, which knows what to tell the user.
    """
    with pil_open(fp) as img:
        return decode_reduced(img, None)[0]


def decode_reduced(img, target: int | None):
    """Load ``img`` (opened, not yet loaded) upright and no larger than needed for a ``target``-pixel network input.

    Returns ``(rgb uint8 array, (width, height), (sx, sy))``: the frame as shown (EXIF orientation applied),
    the file's size as shown, and the scale from the array's pixels back to it (1.0 when nothing was
    reduced). A frame is reduced only when its longer side is at least twice ``target``: JPEGs are decoded
    at 1/2, 1/4 or 1/8 scale by the decoder itself (``draft``), other formats are decoded and box-averaged
    by an integer factor (``reduce``) before any float conversion, so the result's longer side stays in
    ``[target, 2 * target)`` and letterboxing it loses nothing. The frame is turned after decoding, before
    reducing.
    """
    width, height = img.size
    reduce_to = target if target and max(width, height) >= 2 * target else None
    if reduce_to and img.format == "JPEG":
        img.draft(None, (reduce_to, reduce_to))
    img.load()
    if exif_orientation(img) in QUARTER_TURNS:  # read after load(): a PNG's EXIF chunk may follow its pixels
        width, height = height, width
    img = upright(img)
    factor = max(img.size) // reduce_to if reduce_to else 1
    if factor >= 2:
        if img.mode in _SIXTEEN_BIT:
            img = img.convert("I")
        img = img.reduce(factor)
    rgb = to_rgb8(img)
    return rgb, (width, height), (width / rgb.shape[1], height / rgb.shape[0])
