"""YOLO datasets: the sample contract, exact validation pixels and boxes, collate, ultralytics round trips, augmentation."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from models.processing import letterbox
from tests.helpers.data import make_yolo_dataset
from training.data import AugmentConfig, build_dataset, collate, read_data_yaml
from training.data.coco import write_coco
from training.data.synthetic import CLASS_NAMES, generate_dataset


def test_sample_contract(source_yaml):  # noqa: F811
    ds = build_dataset(source_yaml, split="train", imgsz=128)
    assert (len(ds), ds.names, ds.nc) == (10, CLASS_NAMES, len(CLASS_NAMES))
    s = ds[0]
    assert s["img"].dtype == torch.uint8 and s["img"].shape == (3, 128, 128)
    n = len(s["cls"])
    assert n > 0 and s["cls"].shape == (n, 1) and s["bboxes"].shape == (n, 4) and s["orig_xyxy"].shape == (n, 4)
    assert s["cls"].dtype == torch.float32 and s["bboxes"].dtype == torch.float32
    assert s["ori_shape"] == (96, 96) and s["letterbox"].ratio == pytest.approx(128 / 96)
    assert len(build_dataset(source_yaml, split="val", imgsz=128)) == 2


def test_validation_keeps_pixels_and_boxes_exact(tmp_path):
    data = make_yolo_dataset(tmp_path, {"a": "1 0.5 0.5 0.2 0.4\n0 0.25 0.75 0.1 0.1\n"}, size=(60, 100))
    ds = build_dataset(data, "val", imgsz=64)
    s = ds[0]
    original = np.asarray(Image.open(tmp_path / "images/train/a.png").convert("RGB"))
    boxed, info = letterbox(original, 64)
    assert torch.equal(s["img"], torch.from_numpy(boxed.transpose(2, 0, 1).copy()))
    expected_orig = np.array([[40, 18, 60, 42], [20, 42, 30, 48]], np.float32)
    np.testing.assert_allclose(s["orig_xyxy"].numpy(), expected_orig, atol=1e-4)
    # letterbox: 100x60 -> ratio 0.64, 64x38 placed at y offset 13
    assert (info.ratio, info.pad_x, info.pad_y) == (0.64, 0.0, 13.0)
    xyxy = expected_orig * 0.64 + np.array([0, 13, 0, 13])
    cxcywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2, xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1) / 64
    np.testing.assert_allclose(s["bboxes"].numpy(), cxcywh, atol=1e-6)
    assert s["cls"].view(-1).tolist() == [1.0, 0.0]


def test_collate_gives_the_ultralytics_loss_batch(source_yaml):  # noqa: F811
    from ultralytics.utils.loss import v8DetectionLoss

    from models import DetectionModel

    ds = build_dataset(source_yaml, "train", imgsz=64)
    samples = [ds[i] for i in range(3)]
    batch = collate(samples)
    counts = [len(s["cls"]) for s in samples]
    assert batch["img"].shape == (3, 3, 64, 64) and batch["img"].dtype == torch.uint8
    assert batch["batch_idx"].tolist() == sum(([float(i)] * c for i, c in enumerate(counts)), [])
    assert batch["cls"].shape == (sum(counts), 1) and batch["bboxes"].shape == (sum(counts), 4)
    assert len(batch["im_file"]) == len(batch["letterbox"]) == len(batch["orig_xyxy"]) == 3
    model = DetectionModel("yolo11n", nc=ds.nc, names=ds.names, imgsz=64)
    model.train()
    loss, _ = v8DetectionLoss(model)(model(batch["img"].float() / 255), batch)
    assert torch.isfinite(loss).all() and loss.sum() > 0


def test_ultralytics_reads_our_dataset_with_the_same_boxes(tmp_path):
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.utils import DEFAULT_CFG

    data = generate_dataset(tmp_path / "ds", "egocentric", n=5, imgsz=64, seed=1, val_fraction=0.4)
    cfg = read_data_yaml(data)
    ours = build_dataset(data, "train", imgsz=64)
    theirs = build_yolo_dataset(get_cfg(DEFAULT_CFG, {"imgsz": 64}), str(cfg["train"][0]), 2,
                                {"names": dict(enumerate(cfg["names"])), "nc": cfg["nc"], "channels": 3}, mode="val")
    assert [lb["im_file"] for lb in theirs.labels] == [str(r.im_file) for r in ours.records]
    for i, lb in enumerate(theirs.labels):
        cls, boxes = ours.labels(i)
        np.testing.assert_array_equal(lb["cls"].ravel(), cls)
        np.testing.assert_allclose(lb["bboxes"], boxes, atol=1e-6)
        assert tuple(lb["shape"]) == (64, 64)


def test_we_read_what_ultralytics_writes(tmp_path):
    from ultralytics.data.converter import convert_coco

    data = generate_dataset(tmp_path / "ds", "source", n=5, imgsz=64, seed=2, val_fraction=0.4)
    ours = build_dataset(data, "val", imgsz=64)
    write_coco(ours, tmp_path / "ann" / "val.json", image_root=tmp_path / "ds/images/val")
    convert_coco(str(tmp_path / "ann"), str(tmp_path / "conv"), cls91to80=False)  # ultralytics writes YOLO labels
    shutil.copytree(tmp_path / "ds/images/val", tmp_path / "conv/images/val")
    from training.data.yolo import write_data_yaml

    conv_yaml = write_data_yaml(tmp_path / "conv/data.yaml", root=tmp_path / "conv", train="images/val", val="images/val", names=ours.names)
    theirs = build_dataset(conv_yaml, "val", imgsz=64)
    assert len(theirs) == len(ours) == 2
    for i in range(len(ours)):
        a, b = ours[i], theirs[i]
        assert torch.equal(a["img"], b["img"]) and torch.equal(a["cls"], b["cls"])
        np.testing.assert_allclose(a["orig_xyxy"], b["orig_xyxy"], atol=1e-3)


def test_horizontal_flip_moves_boxes_exactly(tmp_path):
    data = make_yolo_dataset(tmp_path, {"a": "2 0.3 0.5 0.2 0.4\n"}, size=(64, 64))
    cfg = AugmentConfig(fliplr=1.0, brightness=0, contrast=0, saturation=0, hue=0, scale=(1.0, 1.0), translate=0.0)
    plain, flipped = build_dataset(data, "train", imgsz=64)[0], build_dataset(data, "train", imgsz=64, augment=cfg)[0]
    assert torch.equal(flipped["img"], plain["img"].flip(-1))
    expected = plain["bboxes"].clone()
    expected[:, 0] = 1 - expected[:, 0]
    torch.testing.assert_close(flipped["bboxes"], expected)
    torch.testing.assert_close(flipped["orig_xyxy"], torch.tensor([[38.4, 19.2, 51.2, 44.8]]), atol=1e-4, rtol=0)


def test_random_augmentation_keeps_boxes_valid(source_yaml):  # noqa: F811
    ds = build_dataset(source_yaml, "train", imgsz=96, augment=True)
    torch.manual_seed(1)
    changed = 0
    for i in range(len(ds)):
        s, plain = ds[i], ds.records[i]
        b = s["bboxes"]
        assert s["img"].shape == (3, 96, 96) and len(b) == len(s["cls"]) == len(s["orig_xyxy"])
        assert ((b[:, :2] - b[:, 2:] / 2) >= -1e-5).all() and ((b[:, :2] + b[:, 2:] / 2) <= 1 + 1e-5).all()
        assert (b[:, 2:] > 0).all()
        changed += len(b) != len(plain.cls) or not np.allclose(b.numpy(), plain.boxes, atol=1e-3)
    assert changed >= len(ds) // 2


def test_mosaic_tiles_four_images_with_their_boxes(source_yaml):  # noqa: F811
    cfg = AugmentConfig(fliplr=0, brightness=0, contrast=0, saturation=0, hue=0, scale=(1.0, 1.0), translate=0.0, mosaic=1.0)
    ds = build_dataset(source_yaml.parent, "train", imgsz=96, augment=cfg)  # a dataset folder works too
    plain = build_dataset(source_yaml, "train", imgsz=48)
    torch.manual_seed(0)
    s = ds[0]
    first = plain[0]
    assert torch.equal(s["img"][:, :48, :48], first["img"])  # top-left tile is sample 0 at half size
    top_left = s["bboxes"][(s["bboxes"][:, 0] < 0.5) & (s["bboxes"][:, 1] < 0.5)]
    assert len(s["bboxes"]) >= len(first["bboxes"])
    torch.testing.assert_close(top_left[: len(first["bboxes"])] * 2, first["bboxes"], atol=1e-5, rtol=0)


def test_a_moved_dataset_still_reads(tmp_path):
    data = generate_dataset(tmp_path / "made", "source", n=3, imgsz=64, seed=0, val_fraction=0.34)
    moved = tmp_path / "elsewhere"
    shutil.move(str(data.parent), moved)  # data.yaml's absolute 'path' now points nowhere
    cfg = read_data_yaml(moved / "data.yaml")
    assert cfg["root"] == moved.resolve() and cfg["names"] == CLASS_NAMES
    assert len(build_dataset(moved / "data.yaml", "train", imgsz=64)) == 2


def test_names_as_list_and_nc_mismatch(tmp_path):
    from models.errors import DataError

    (tmp_path / "images/train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images/train/x.png")
    (tmp_path / "d.yaml").write_text("train: images/train\nval: images/train\nnames: [cat, dog]\n")
    ds = build_dataset(tmp_path / "d.yaml", "val", imgsz=32)
    assert ds.names == ["cat", "dog"] and len(ds) == 1 and len(ds[0]["cls"]) == 0  # no label file: background image
    (tmp_path / "d.yaml").write_text("train: images/train\nval: images/train\nnc: 3\nnames: [cat, dog]\n")
    with pytest.raises(DataError, match="nc=3 but 2 names"):
        build_dataset(tmp_path / "d.yaml", "val", imgsz=32)
