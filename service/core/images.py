"""Decoding uploaded images under the service's limits, with memory bounded.

The header is read first: the pixel count is checked before a single pixel is
decoded, so a decompression bomb costs nothing. The decode itself is size-aware
(``models.images.decode_reduced``): a frame much larger than the model's input is
decoded at reduced scale (JPEG) or box-reduced right after decoding (other
formats), before any float conversion, and turned upright by its EXIF orientation
(as browsers and OpenCV show it). :class:`DecodeBudget` bounds the decoded
bytes all requests hold at once. Formats are restricted to the common raster
ones so that no exotic decoder runs on untrusted bytes.
"""

from __future__ import annotations

import io
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.errors import DataError
from models.images import MODE_BYTES, decode_reduced, exif_orientation, pil_open
from service.core.errors import NotReadyError, PayloadTooLargeError, UnsupportedMediaError

FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")


class DecodeBudget:
    """Decoded bytes held at once by all requests; a request waits (up to ``timeout``) for room.

    One request larger than the whole budget still runs, alone.
    """

    def __init__(self, capacity: int, timeout: float = 30.0):
        self.capacity, self.timeout = int(capacity), timeout
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while self.used and self.used + nbytes > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NotReadyError("the server is decoding too many large images at once; retry shortly")
                self._cond.wait(left)
            self.used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


@dataclass
class Decoded:
    """A decoded frame as shown (EXIF orientation applied): ``rgb`` (maybe reduced), the file's ``width`` x
    ``height`` as shown (swapped for a quarter turn), and the scale from ``rgb``'s pixels back to them."""

    rgb: np.ndarray
    width: int
    height: int
    scale: tuple[float, float]


def _open(data: bytes, max_bytes: int, max_pixels: int):
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"the image is {len(data)} bytes, more than the limit of {max_bytes}; send a smaller or compressed frame"
        )
    if not data:
        raise UnsupportedMediaError("the image is empty; send the bytes of a JPEG, PNG, BMP, WebP or TIFF file")
    try:
        img = pil_open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedMediaError(
            "the upload is not an image this service reads; send a JPEG, PNG, BMP, WebP or TIFF file"
        ) from None
    except Image.DecompressionBombError:
        raise PayloadTooLargeError(f"the image has too many pixels (limit {max_pixels}); send a smaller frame") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"the image header is corrupt ({exc}); send an intact image file") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise DataError(f"the image has an empty size {width}x{height}; send an intact image file")
    if width * height > max_pixels:
        raise PayloadTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}; "
            "downscale it before sending"
        )
    return img


def decode_cost(img, target: int | None) -> int:
    """Upper bound of the bytes decoding ``img`` holds at once (the decoded frame and its RGB copy).

    A frame turned by its EXIF orientation holds one more decoded frame (the turned copy) until it is converted;
    a PNG whose EXIF chunk comes after its pixels is not counted so.
    """
    width, height = img.size
    if target and img.format == "JPEG" and max(width, height) >= 2 * target:
        scale = min(8, max(1, min(width, height) // target))
        scale = 1 << (scale.bit_length() - 1)  # the decoder's 1/2, 1/4, 1/8
        width, height = -(-width // scale), -(-height // scale)
    frame = MODE_BYTES.get(img.mode, 4)
    # a PNG's EXIF chunk may follow its pixels, and Pillow would decode them (outside this budget) to find it
    header_tells = img.format != "PNG" or "exif" in img.info
    turned = frame if header_tells and exif_orientation(img) != 1 else 0
    return width * height * (frame + turned + 4)


def decode_upload(
    data: bytes, max_bytes: int, max_pixels: int, target: int | None = None, budget: DecodeBudget | None = None
) -> Decoded:
    """Bytes of a JPEG / PNG / BMP / WebP / TIFF -> :class:`Decoded` (first frame, upright as its EXIF says).

    With ``target`` (the model's input size) large frames come back reduced; ``scale`` maps them back to
    the upright frame the user sees, so boxes land where a browser draws the picture.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = _open(data, max_bytes, max_pixels)
        reserve = budget.reserve(decode_cost(img, target)) if budget is not None else _nothing()
        with reserve:
            try:
                rgb, (width, height), scale = decode_reduced(img, target)
            except Image.DecompressionBombError:
                raise PayloadTooLargeError(
                    f"the image has too many pixels (limit {max_pixels}); send a smaller frame") from None
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise DataError(f"the image data is corrupt or truncated ({exc}); send an intact image file") from None
            finally:
                img.close()
    return Decoded(rgb, width, height, scale)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Bytes of an image -> HxWx3 uint8 RGB at full size, upright (16-bit and float images scaled to 8 bits)."""
    return decode_upload(data, max_bytes, max_pixels).rgb
