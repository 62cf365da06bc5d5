"""EXIF orientation: every decoder gives the frame as shown (as browsers, ``cv2.imread`` and ultralytics do).

A phone or glasses JPEG stored sideways with Orientation=6 must decode upright for datasets, the runtime,
``glasses-vision predict`` and HTTP, with HTTP boxes, sizes and scales in that upright frame.

JPEG tolerance: OpenCV and Pillow decode the same bytes with libjpeg(-turbo) (integer IDCT, fancy chroma
upsampling); their bundled builds may round a level or two apart, so pixels are compared with ``atol=2``.
A wrong orientation is far off on the scene below (its red block moves across the frame), which
``test_the_scene_tells_orientations_apart`` checks, so the tolerance cannot hide one.
"""

from __future__ import annotations

import io
import json
import random
import struct

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from export.runtime import load_image as runtime_load_image
from models.images import read_rgb, upright, upright_size
from service.core.config import DEFAULT_MODEL_ID
from service.core.images import decode_cost, decode_image, decode_upload
from training.data import build_dataset, read_data_yaml
from training.data.coco import CocoDataset, write_coco
from training.data.dataset import load_image as dataset_load_image
from training.data.yolo import write_data_yaml

JPEG_ATOL = 2
ORIENTATION = 0x0112
NAMES = ["cup", "bottle", "phone", "book", "keyboard", "food_label"]


def scene(height: int, width: int) -> np.ndarray:
    """Smooth gradients (small JPEG and resampling error) and a red block near the top-left corner."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 128 // (width + height) + 60], -1)
    img[height // 8 : height // 3, width // 10 : width // 3] = (250, 40, 40)
    return img.astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG", orientation: int | None = None, exif: bytes | None = None) -> bytes:
    if orientation is not None:
        block = Image.Exif()
        block[ORIENTATION] = orientation
        block[0x010F] = "Glasses Vision test"  # Make: a second tag, as cameras write
        exif = block.tobytes()
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    if exif is not None:
        options["exif"] = exif
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **options)
    return buf.getvalue()


def cv2_rgb(path) -> np.ndarray:
    """What ultralytics' training, validation and predictor read: ``cv2.imread`` applies the EXIF orientation."""
    return np.ascontiguousarray(cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1])


def red_centroid(rgb: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero((rgb[..., 0] > 200) & (rgb[..., 1] < 90) & (rgb[..., 2] < 110))
    return np.array([xs.mean(), ys.mean()])


def assert_close_jpeg(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.astype(np.int16), theirs.astype(np.int16), atol=JPEG_ATOL, rtol=0)


def tiff_ifd(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """An EXIF block by hand: big-endian TIFF header and one IFD of ``(tag, type, count, 4-byte value)``."""
    ifd = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HHI", *e[:3]) + e[3] for e in entries) + b"\0" * 4
    return b"Exif\x00\x00MM\x00\x2a" + struct.pack(">I", 8) + ifd


# --- every entry point, every orientation ----------------------------------------------------------------


def test_the_scene_tells_orientations_apart(tmp_path):
    stored = scene(40, 72)
    path = tmp_path / "stored.jpg"
    path.write_bytes(encode(stored, orientation=3))
    as_stored = np.asarray(Image.open(io.BytesIO(encode(stored))).convert("RGB"))
    assert np.abs(cv2_rgb(path).astype(int) - as_stored).mean() > 40  # so JPEG_ATOL cannot hide a wrong turn


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_decoder_reads_each_orientation_as_opencv_does(tmp_path, orientation):
    stored = scene(40, 72)  # 40 rows: a partial JPEG block row; not square, so quarter turns swap the size
    data = encode(stored, orientation=orientation)
    path = tmp_path / f"o{orientation}.jpg"
    path.write_bytes(data)
    expected = cv2_rgb(path)
    assert expected.shape[:2] == ((72, 40) if orientation >= 5 else (40, 72))

    decoded = decode_upload(data, max_bytes=len(data), max_pixels=10**6)
    assert (decoded.width, decoded.height) == (expected.shape[1], expected.shape[0]) and decoded.scale == (1.0, 1.0)
    assert_close_jpeg(decoded.rgb, expected)  # HTTP
    np.testing.assert_array_equal(decode_image(data, len(data), 10**6), decoded.rgb)
    np.testing.assert_array_equal(read_rgb(path), decoded.rgb)
    np.testing.assert_array_equal(dataset_load_image(path), decoded.rgb)  # what training and evaluation see
    np.testing.assert_array_equal(runtime_load_image(path), decoded.rgb)  # Detector and `glasses-vision predict`
    with Image.open(path) as pil:  # a PIL image passed in: ultralytics' predictor applies exif_transpose too
        assert upright_size(pil) == (decoded.width, decoded.height)
        np.testing.assert_array_equal(runtime_load_image(pil), decoded.rgb)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation, turn", [
    (2, np.fliplr), (3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)), (8, np.rot90),
])
def test_lossless_formats_turn_exactly(fmt, orientation, turn):
    stored = scene(30, 50)
    data = encode(stored, fmt, orientation=orientation)
    decoded = decode_upload(data, len(data), 10**6)
    np.testing.assert_array_equal(decoded.rgb, turn(stored))
    assert (decoded.width, decoded.height) == (decoded.rgb.shape[1], decoded.rgb.shape[0])
    with Image.open(io.BytesIO(data)) as img:  # Pillow turns a TIFF itself on load and reports it turned at open
        assert upright_size(img) == (decoded.width, decoded.height)


def test_a_png_exif_chunk_after_the_pixels_counts_too(tmp_path):
    """OpenCV honours an eXIf chunk after IDAT; Pillow finds it on load. The decode reads the orientation after load."""
    data = encode(scene(30, 50), "PNG", orientation=6)
    chunks, at = [], 8
    while at < len(data):
        size = struct.unpack(">I", data[at : at + 4])[0]
        chunks.append(data[at : at + 12 + size])
        at += 12 + size
    exif = next(c for c in chunks if c[4:8] == b"eXIf")
    rest = [c for c in chunks if c is not exif]
    late = data[:8] + b"".join(rest[:-1]) + exif + rest[-1]  # ... IDAT, eXIf, IEND
    path = tmp_path / "late.png"
    path.write_bytes(late)
    with Image.open(path) as img:
        assert "exif" not in img.info  # not known from the header
        assert decode_cost(img, None) == 30 * 50 * (4 + 4)  # so not counted (Pillow would decode to find it)
    decoded = decode_upload(late, len(late), 10**6)
    np.testing.assert_array_equal(decoded.rgb, cv2_rgb(path))
    assert (decoded.width, decoded.height) == (30, 50)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "WEBP", "TIFF"])
def test_frames_without_exif_are_untouched(fmt):
    stored = scene(30, 50)
    data = encode(stored, fmt)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert upright(img) is img  # no copy, no transpose
        plain = np.asarray(img.convert("RGB"))
    decoded = decode_upload(data, len(data), 10**6)
    np.testing.assert_array_equal(decoded.rgb, plain)
    assert (decoded.width, decoded.height) == (50, 30)


# --- corrupt or absurd EXIF: the frame as stored, never a crash -------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damage it skips
@pytest.mark.parametrize("exif", [
    tiff_ifd([(ORIENTATION, 3, 1, struct.pack(">HH", 0, 0))]),
    tiff_ifd([(ORIENTATION, 3, 1, struct.pack(">HH", 9, 0))]),
    tiff_ifd([(ORIENTATION, 3, 1, struct.pack(">HH", 65535, 0))]),
    tiff_ifd([(ORIENTATION, 2, 2, b"6\x00\x00\x00")]),  # "6" as text
    tiff_ifd([(ORIENTATION, 3, 1, struct.pack(">HH", 6, 0))])[:-10],  # the IFD cut short
    b"Exif\x00\x00" + b"not a TIFF header at all",
    b"Exif\x00\x00II\x2a\x00\xff\xff\xff\x7f",  # IFD offset far past the block
], ids=["zero", "nine", "65535", "text", "truncated", "garbage", "bad-offset"])
def test_absurd_or_corrupt_exif_keeps_the_stored_frame(exif):
    stored = scene(40, 72)
    data = encode(stored, exif=exif)
    decoded = decode_upload(data, len(data), 10**6)
    np.testing.assert_array_equal(decoded.rgb, decode_image(encode(stored), 10**6, 10**6))
    assert (decoded.width, decoded.height) == (72, 40)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_exif_block_pillow_cannot_write_back_still_turns(tmp_path):
    """Orientation 6 next to a Make tag typed FLOAT: Pillow 13's exif_transpose reads it, then fails re-writing
    the block without the tag (AttributeError). We drop the metadata and turn anyway, as OpenCV does."""
    exif = tiff_ifd([(0x010F, 11, 1, b"ABCD"), (ORIENTATION, 3, 1, struct.pack(">HH", 6, 0))])
    path = tmp_path / "odd.jpg"
    path.write_bytes(encode(scene(40, 72), exif=exif))
    decoded = decode_upload(path.read_bytes(), 10**6, 10**6)
    assert (decoded.width, decoded.height) == (40, 72)
    assert_close_jpeg(decoded.rgb, cv2_rgb(path))
    np.testing.assert_array_equal(read_rgb(path), decoded.rgb)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutated_exif_blocks_never_break_the_decode():
    block = Image.Exif()
    block[ORIENTATION] = 6
    block[0x010F], block[0x0110], block[0x0131] = "Glasses", "Vision one", "firmware 1.2"
    good = bytearray(block.tobytes())
    stored = scene(24, 40)
    rng = random.Random(0)
    turned = 0
    for _ in range(150):
        bad = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            bad[rng.randrange(6, len(bad))] = rng.randrange(256)
        if rng.random() < 0.2:
            bad = bad[: rng.randrange(6, len(bad))]
        data = encode(stored, exif=bytes(bad))
        decoded = decode_upload(data, len(data), 10**6, target=8)  # the reduced path as well
        h, w = decoded.rgb.shape[:2]
        assert (decoded.width, decoded.height) in ((40, 24), (24, 40))
        assert decoded.scale == (decoded.width / w, decoded.height / h)
        np.testing.assert_array_equal(read_rgb(io.BytesIO(data)).shape[:2], (decoded.height, decoded.width))
        turned += decoded.width == 24
    assert 0 < turned < 150  # both outcomes were exercised


# --- reduced (draft / reduce) decode ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])  # JPEG: the decoder's draft scale; PNG: reduce() after decoding
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_the_reduced_decode_equals_full_decode_then_resize(fmt, orientation):
    data = encode(scene(600, 900), fmt, orientation=orientation)
    reduced = decode_upload(data, len(data), 10**7, target=160)
    full = decode_image(data, len(data), 10**7)
    h, w = reduced.rgb.shape[:2]
    assert max(h, w) < max(full.shape[:2]) and 160 <= max(h, w) < 320
    assert (reduced.width, reduced.height) == (full.shape[1], full.shape[0])  # the upright size, 600x900 if turned
    assert reduced.scale == (full.shape[1] / w, full.shape[0] / h)
    resized = cv2.resize(full, (w, h), interpolation=cv2.INTER_AREA)
    diff = np.abs(resized.astype(np.int16) - reduced.rgb)
    # mean < 1 level, 99% within 3: JPEG DCT scaling and reduce()'s edge blocks differ from INTER_AREA only along
    # the block's edges; a wrong turn or swapped scale is tens of levels off on average
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 3
    # where the scale maps a reduced pixel back to: the red block's centre within one reduced pixel
    np.testing.assert_allclose(red_centroid(reduced.rgb) * reduced.scale, red_centroid(full), atol=max(reduced.scale))


def test_the_decode_budget_counts_the_turned_copy():
    plain, turned = (Image.open(io.BytesIO(encode(scene(40, 72), orientation=o))) for o in (1, 6))
    assert decode_cost(plain, None) == 40 * 72 * (4 + 4)
    assert decode_cost(turned, None) == 40 * 72 * (4 + 4 + 4)  # decoded, turned copy, RGB array


# --- HTTP ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """The firing test detector (plenty of boxes untrained) exported at 64 px."""
    from export import export_onnx
    from tests.helpers.models import firing_model

    out = tmp_path_factory.mktemp("exif_onnx") / "model.onnx"
    export_onnx(firing_model(imgsz=64), out, imgsz=64, verify=False)
    return out


def _boxes(body: dict) -> np.ndarray:
    return np.asarray([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in body["detections"]]).reshape(-1, 4)


@pytest.mark.parametrize("stored_hw", [(64, 96), (240, 400)], ids=["full", "reduced"])
def test_http_boxes_on_a_sideways_jpeg_equal_boxes_on_the_upright_picture(home, tmp_path, tiny_onnx, stored_hw):
    """Orientation=6 upload vs the picture the user sees (``cv2.imread`` of it) saved as PNG: same size, same boxes.

    ``full`` decodes at full size on both sides, so the pixels agree to JPEG_ATOL and the boxes to a hundredth
    of a pixel; ``reduced`` (the JPEG decoded at 1/2 by the draft path, the PNG box-reduced) checks that boxes
    are scaled back in the upright frame: the same objects, a pixel or two apart in the 240x400 frame."""
    from tests.helpers.service import make_settings, register_dummy_model, wait_for
    from service.main import create_app

    sideways = tmp_path / "sideways.jpg"
    sideways.write_bytes(encode(scene(*stored_hw), orientation=6))
    upright_png = encode(cv2_rgb(sideways), "PNG")
    register_dummy_model(home, DEFAULT_MODEL_ID, onnx_file=tiny_onnx, classes=NAMES, imgsz=64)
    query = "/v1/detect?conf=0.3&iou=0.7&max_det=20"
    with TestClient(create_app(make_settings(home))) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 30, what="ready")
        turned = c.post(query, files={"image": ("s.jpg", sideways.read_bytes(), "image/jpeg")}).json()
        shown = c.post(query, files={"image": ("u.png", upright_png, "image/png")}).json()
    assert turned["image"] == shown["image"] == {"width": stored_hw[0], "height": stored_hw[1]}
    assert shown["detections"], "the firing model gives boxes at conf 0.3"
    if stored_hw == (64, 96):
        assert [d["class_name"] for d in turned["detections"]] == [d["class_name"] for d in shown["detections"]]
        np.testing.assert_allclose(_boxes(turned), _boxes(shown), atol=0.01)
    else:  # every upright box has a twin among the sideways upload's boxes
        ours, theirs = _boxes(turned), _boxes(shown)
        nearest = np.abs(theirs[:, None, :] - ours[None, :, :]).max(axis=2).min(axis=1)
        assert np.median(nearest) < 2.0 and ours[:, 2].max() <= 240 + 1e-3 and ours[:, 3].max() <= 400 + 1e-3


def test_http_size_scale_and_render_are_upright(client):
    """FakeDetector boxes the whole frame it is given; mapped back, the box must fill the upright frame."""
    data = encode(scene(300, 500), orientation=8)  # 64 px model: decoded reduced, shown 300 wide, 500 tall
    body = client.post("/v1/detect", files={"image": ("f.jpg", data, "image/jpeg")}).json()
    assert body["image"] == {"width": 300, "height": 500}
    (box,) = body["detections"]
    assert 0 < box["x1"] < 5 and 0 < box["y1"] < 5 and 295 < box["x2"] < 300 and 495 < box["y2"] < 500
    drawn = client.post("/v1/detect?render=true", files={"image": ("f.jpg", data, "image/jpeg")})
    assert drawn.headers["X-Image-Size"] == "300x500"
    with Image.open(io.BytesIO(drawn.content)) as png:
        assert png.size == (300, 500)


# --- datasets -----------------------------------------------------------------------------------------------


def test_the_dataset_reader_gives_upright_frames_in_the_labels_frame(tmp_path):
    """A sideways JPEG whose YOLO label is in the upright frame, as ultralytics' ``verify_image_label`` reads it."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.utils import DEFAULT_CFG

    stored = scene(60, 100)
    (tmp_path / "images/train").mkdir(parents=True)
    (tmp_path / "labels/train").mkdir(parents=True)
    path = tmp_path / "images/train/a.jpg"
    path.write_bytes(encode(stored, orientation=6))
    shown = cv2_rgb(path)  # 100 rows, 60 columns
    x0, y0 = red_centroid(shown)
    (tmp_path / "labels/train/a.txt").write_text(f"0 {x0 / 60:.6f} {y0 / 100:.6f} 0.2 0.1\n")
    data = write_data_yaml(tmp_path / "data.yaml", root=tmp_path, train="images/train", val="images/train",
                           names=["red"])

    ds = build_dataset(data, "train", imgsz=64)
    sample = ds[0]
    assert sample["ori_shape"] == (100, 60)
    cfg = read_data_yaml(data)
    theirs = build_yolo_dataset(get_cfg(DEFAULT_CFG, {"imgsz": 64}), str(cfg["train"][0]), 1,
                                {"names": {0: "red"}, "nc": 1, "channels": 3}, mode="val")
    assert tuple(theirs.labels[0]["shape"]) == sample["ori_shape"]  # ultralytics' exif_size
    x1, y1, x2, y2 = sample["orig_xyxy"][0].round().int().tolist()
    inside = dataset_load_image(path)[y1:y2, x1:x2]
    assert inside[..., 0].mean() > 200 and inside[..., 1].mean() < 90  # the label sits on the red block


def test_coco_sizes_are_upright(tmp_path):
    """COCO boxes are in the picture as shown; a file without width/height takes its size from the header, upright."""
    path = tmp_path / "images" / "a.jpg"
    path.parent.mkdir()
    path.write_bytes(encode(scene(60, 100), orientation=6))  # shown 60 wide, 100 tall
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 70, 40, 25], "iscrowd": 0}],
           "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "val.json").write_text(json.dumps(doc))
    ds = CocoDataset(tmp_path / "val.json", imgsz=64)  # strict: a box outside the stored 100x60 frame would raise
    assert ds[0]["ori_shape"] == (100, 60)
    written = json.loads(write_coco(ds, tmp_path / "out.json").read_text())
    assert (written["images"][0]["width"], written["images"][0]["height"]) == (60, 100)
