"""COCO json behind the same interface: our generated data written as COCO reads back identically."""

from __future__ import annotations

import numpy as np
import torch

from training.data import build_dataset, read_data_yaml
from training.data.coco import CocoDataset, write_coco
from training.data.yolo import write_data_yaml


def test_coco_round_trip_matches_yolo(ego_yaml, tmp_path):  # noqa: F811
    yolo = build_dataset(ego_yaml, "train", imgsz=64)
    ann = write_coco(yolo, tmp_path / "train.json", image_root=ego_yaml.parent)
    coco = CocoDataset(ann, imgsz=64, image_root=ego_yaml.parent)
    assert coco.names == yolo.names and len(coco) == len(yolo)
    for i in range(len(yolo)):
        a, b = yolo[i], coco[i]
        assert torch.equal(a["img"], b["img"]) and torch.equal(a["cls"], b["cls"])
        torch.testing.assert_close(a["bboxes"], b["bboxes"], atol=1e-5, rtol=0)
        torch.testing.assert_close(a["orig_xyxy"], b["orig_xyxy"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(yolo.labels(i)[1], coco.labels(i)[1], atol=1e-6)


def test_data_yaml_split_may_be_a_coco_json(ego_yaml, tmp_path):  # noqa: F811
    cfg = read_data_yaml(ego_yaml)
    val = build_dataset(ego_yaml, "val", imgsz=64)
    write_coco(val, tmp_path / "val.json")  # images elsewhere: file_name is absolute
    mixed = write_data_yaml(tmp_path / "mixed.yaml", root=cfg["root"], train="images/train", val=str(tmp_path / "val.json"),
                            names=cfg["names"])
    ds = build_dataset(mixed, "val", imgsz=64)
    assert type(ds).__name__ == "CocoDataset" and len(ds) == len(val)
    assert ds.summary()["boxes"] == val.summary()["boxes"]
    assert len(build_dataset(tmp_path / "mixed.yaml", "train", imgsz=64)) == 8


def test_coco_without_image_sizes_reads_them_from_the_files(ego_yaml, tmp_path):  # noqa: F811
    import json

    yolo = build_dataset(ego_yaml, "val", imgsz=64)
    ann = write_coco(yolo, tmp_path / "val.json")
    doc = json.loads(ann.read_text())
    for im in doc["images"]:
        del im["width"], im["height"]
    ann.write_text(json.dumps(doc))
    coco = CocoDataset(ann, imgsz=64)
    np.testing.assert_allclose(coco.labels(0)[1], yolo.labels(0)[1], atol=1e-6)
