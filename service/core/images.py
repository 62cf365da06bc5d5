"""Decoding uploaded images under the service's limits.

The header is read first: the pixel count is checked before a single pixel is
decoded, so a decompression bomb costs nothing. Formats are restricted to the
common raster ones so that no exotic decoder runs on untrusted bytes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.errors import DataError
from models.images import pil_open
from service.core.errors import PayloadTooLargeError, UnsupportedMediaError

FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Bytes of a JPEG / PNG / BMP / WebP / TIFF -> HxWx3 uint8 RGB (first frame, pixel order as stored)."""
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"the image is {len(data)} bytes, more than the limit of {max_bytes}; send a smaller or compressed frame"
        )
    if not data:
        raise UnsupportedMediaError("the image is empty; send the bytes of a JPEG, PNG, BMP, WebP or TIFF file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
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
        try:
            img.load()
            rgb = img.convert("RGB")
        except Image.DecompressionBombError:
            raise PayloadTooLargeError(f"the image has too many pixels (limit {max_pixels}); send a smaller frame") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise DataError(f"the image data is corrupt or truncated ({exc}); send an intact image file") from None
    return np.asarray(rgb, dtype=np.uint8)
