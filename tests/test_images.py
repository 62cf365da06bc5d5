"""One image decoder: a file gives the same RGB pixels to datasets, the runtime and HTTP."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from export.runtime import load_image
from models.errors import DataError
from models.images import read_rgb
from service.core.images import decode_image
from training.data.dataset import load_image as load_dataset_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray((np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 20).astype(np.uint16)),  # 16-bit
        lambda: Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 4), dtype=np.uint8), "RGBA"),
        lambda: Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 30), dtype=np.uint8), "L").convert("P"),
    ],
    ids=["16-bit gray", "RGBA", "palette"],
)
def test_datasets_runtime_and_http_decode_a_file_to_the_same_pixels(tmp_path, make):
    data = _png(make())
    path = tmp_path / "frame.png"
    path.write_bytes(data)
    from_file = load_image(path)
    from_http = decode_image(data, max_bytes=len(data), max_pixels=10**6)
    assert from_file.dtype == np.uint8 and from_file.shape[2] == 3
    np.testing.assert_array_equal(from_file, from_http)
    np.testing.assert_array_equal(read_rgb(path), from_http)
    np.testing.assert_array_equal(load_dataset_image(path), from_http)  # what training sees
    np.testing.assert_array_equal(load_image(Image.open(io.BytesIO(data))), from_http)  # a PIL image passed in


def test_sixteen_bit_frames_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "deep.png"
    path.write_bytes(_png(Image.fromarray(ramp)))
    rgb = load_image(path)
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255  # convert("RGB") would clip all but the darkest to 255
    assert len(np.unique(rgb[..., 0])) > 200


def test_a_corrupt_file_is_a_data_error(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="cannot decode"):
        load_image(path)
