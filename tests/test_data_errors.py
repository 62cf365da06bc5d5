"""Bad data: each case raises a DataError naming the file (and line), or is skipped and counted with strict=False."""

from __future__ import annotations

import json

import pytest

from models.errors import DataError
from tests.helpers.data import make_yolo_dataset
from training.data import build_dataset
from training.data.coco import CocoDataset, write_coco

GOOD = "0 0.5 0.5 0.2 0.2\n"
LABEL_CASES = {
    "wrong_fields": ("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n", "bad.txt line 2: expected 5 fields"),
    "outside_unit": ("1 1.5 0.5 0.2 0.2\n", "bad.txt line 1: coordinates 1.5 0.5 0.2 0.2 must be normalised to [0, 1]"),
    "negative": ("1 0.5 -0.1 0.2 0.2\n", "bad.txt line 1: coordinates"),
    "class_ge_nc": ("\n3 0.5 0.5 0.2 0.2\n", "bad.txt line 2: class id 3 is not an integer in 0..2 (nc=3)"),
    "not_a_number": ("0 0.5 x 0.2 0.2\n", "bad.txt line 1: fields must be numbers"),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_bad_label_line(tmp_path, case):
    text, message = LABEL_CASES[case]
    data = make_yolo_dataset(tmp_path, {"good": GOOD, "bad": text})
    with pytest.raises(DataError) as err:
        build_dataset(data, "train", imgsz=32)
    assert message in str(err.value)
    ds = build_dataset(data, "train", imgsz=32, strict=False)
    assert len(ds) == 1 and ds.skipped == 1 and ds.records[0].im_file.stem == "good"
    assert message in str(ds.problems[0]) and ds.summary()["skipped"] == 1


def _list_dataset(tmp_path, extra_image):
    """A dataset whose train split is a .txt list: one good image plus ``extra_image``."""
    data = make_yolo_dataset(tmp_path, {"good": GOOD})
    (tmp_path / "train.txt").write_text(f"images/train/good.png\n{extra_image}\n")
    data.write_text(data.read_text().replace("train: images/train", "train: train.txt"))
    return data


def test_missing_image(tmp_path):
    data = _list_dataset(tmp_path, "images/train/gone.png")
    with pytest.raises(DataError, match=r"gone\.png: image file is missing"):
        build_dataset(data, "train", imgsz=32)
    ds = build_dataset(data, "train", imgsz=32, strict=False)
    assert (len(ds), ds.skipped) == (1, 1)


def test_unreadable_image(tmp_path):
    import ultralytics.utils.patches  # noqa: F401 - it wraps PIL's Image.open; a bad file must still be a DataError

    data = _list_dataset(tmp_path, "images/train/junk.png")
    (tmp_path / "images/train/junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match=r"junk\.png: image cannot be decoded"):
        build_dataset(data, "train", imgsz=32)
    assert build_dataset(data, "train", imgsz=32, strict=False).skipped == 1


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_image(tmp_path, suffix):
    from PIL import Image

    data = _list_dataset(tmp_path, f"images/train/cut.{suffix}")
    import numpy as np

    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / f"images/train/cut.{suffix}")
    raw = (tmp_path / f"images/train/cut.{suffix}").read_bytes()
    (tmp_path / f"images/train/cut.{suffix}").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=rf"cut\.{suffix}: image cannot be decoded"):
        build_dataset(data, "train", imgsz=32)
    assert build_dataset(data, "train", imgsz=32, strict=False).skipped == 1


def test_empty_dataset(tmp_path):
    data = make_yolo_dataset(tmp_path, {})
    (tmp_path / "images/train").mkdir(parents=True)
    with pytest.raises(DataError, match="no usable images"):
        build_dataset(data, "train", imgsz=32)
    bad_only = make_yolo_dataset(tmp_path / "b", {"bad": "9 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(DataError, match=r"no usable images \(1 skipped: .*bad\.txt line 1"):
        build_dataset(bad_only, "train", imgsz=32, strict=False)


def test_missing_split_and_bad_yaml(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(tmp_path / "nope.yaml", "train")
    (tmp_path / "d.yaml").write_text("train: images/train\nval: images/val\n")
    with pytest.raises(DataError, match="no 'names'"):
        build_dataset(tmp_path / "d.yaml", "train")
    (tmp_path / "d.yaml").write_text("train: images/train\nnames: [a]\n")
    with pytest.raises(DataError, match="no 'val' split"):
        build_dataset(tmp_path / "d.yaml", "val")


def test_coco_bad_category_and_box(tmp_path):
    data = make_yolo_dataset(tmp_path, {"a": GOOD, "b": "1 0.5 0.5 0.4 0.4\n"})
    path = write_coco(build_dataset(data, "train", imgsz=32), tmp_path / "ann.json", image_root=tmp_path)
    doc = json.loads(path.read_text())
    doc["annotations"][0]["category_id"] = 42
    doc["annotations"][1]["bbox"] = [90.0, 10.0, 30.0, 10.0]  # runs past the 100 px wide image
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="category_id 42 is not in 'categories'"):
        CocoDataset(path, imgsz=32)
    with pytest.raises(DataError, match=r"no usable images \(2 skipped"):
        CocoDataset(path, imgsz=32, strict=False)
