"""``build_dataset``: one entry point over the formats (YOLO ``data.yaml``, COCO json, a generated folder).

The format modules (``yolo.py``, ``coco.py``) build on ``dataset.py``; this dispatch sits above all of them,
so that no format module and ``dataset.py`` import each other.
"""

from __future__ import annotations

from pathlib import Path

from models.errors import DataError
from training.data.augment import AugmentConfig
from training.data.coco import CocoDataset
from training.data.dataset import DetectionDataset
from training.data.yolo import YoloDataset, read_data_yaml


def build_dataset(data: str | Path | dict, split: str = "train", imgsz: int = 320, augment: bool | AugmentConfig = False,
                  *, strict: bool = True, check_images: bool = True) -> DetectionDataset:
    """A dataset for ``split`` of a ``data.yaml`` (or its folder; a split may also be a COCO ``.json``) or of a COCO json file."""
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        data = Path(data) / "data.yaml"  # a dataset folder as generate_dataset writes it
    if isinstance(data, (str, Path)) and Path(data).suffix.lower() == ".json":
        return CocoDataset(Path(data), imgsz=imgsz, augment=augment, strict=strict, check_images=check_images)
    cfg = data if isinstance(data, dict) else read_data_yaml(data)
    if split not in cfg:
        present = [s for s in ("train", "val", "test") if s in cfg]
        raise DataError(f"{cfg.get('yaml_file', 'dataset')} has no '{split}' split; it has {', '.join(present)}")
    sources = cfg[split]
    if len(sources) == 1 and sources[0].suffix.lower() == ".json":
        ds = CocoDataset(sources[0], imgsz=imgsz, augment=augment, strict=strict, check_images=check_images)
        if ds.names != cfg["names"]:
            raise DataError(f"{sources[0]}: categories {ds.names} differ from the names {cfg['names']} in {cfg['yaml_file']}")
        return ds
    return YoloDataset(sources, cfg["names"], source=f"{cfg.get('yaml_file', '')}[{split}]", imgsz=imgsz, augment=augment,
                       strict=strict, check_images=check_images)
