"""Datasets (YOLO txt, COCO json, synthetic) behind one interface, augmentation and collate."""

from training.data.augment import AugmentConfig, DetectionAugment
from training.data.dataset import DataProblem, DetectionDataset, build_dataset, collate, load_image
from training.data.yolo import read_data_yaml, write_data_yaml

__all__ = ["AugmentConfig", "DataProblem", "DetectionAugment", "DetectionDataset", "build_dataset", "collate",
           "load_image", "read_data_yaml", "write_data_yaml"]
