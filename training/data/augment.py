"""Box-aware training augmentation with torchvision.transforms.v2 (flip, colour jitter, scale/translate)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from models.processing import LETTERBOX_COLOR


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings; the defaults suit small detectors on egocentric frames.

    fliplr: chance of a horizontal flip. brightness / contrast / saturation / hue: ColorJitter ranges.
    scale: (min, max) zoom of the random affine; translate: max shift as a share of the side;
    degrees: max rotation (boxes become the box of the rotated box). min_box: boxes smaller than this
    many pixels on a side after the transform are dropped with their labels. mosaic: chance that a
    sample is a 2x2 mosaic of itself and three random others (each letterboxed to half size) before
    the transforms above; 0 (off) by default.
    """

    fliplr: float = 0.5
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.5
    hue: float = 0.015
    scale: tuple[float, float] = (0.6, 1.4)
    translate: float = 0.1
    degrees: float = 0.0
    min_box: float = 2.0
    mosaic: float = 0.0


class DetectionAugment:
    """Applies one random augmentation to a letterboxed ``uint8 3xSxS`` image and its ``xyxy`` pixel boxes."""

    def __init__(self, config: AugmentConfig | None = None):
        c = config or AugmentConfig()
        self.config = c
        self.transform = v2.Compose([
            v2.RandomHorizontalFlip(p=c.fliplr),
            v2.ColorJitter(brightness=c.brightness, contrast=c.contrast, saturation=c.saturation, hue=c.hue),
            v2.RandomAffine(degrees=c.degrees, translate=(c.translate, c.translate), scale=c.scale, fill=LETTERBOX_COLOR),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=c.min_box),
        ])

    def __call__(self, image: torch.Tensor, boxes_xyxy: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = image.shape[-2:]
        sample = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes_xyxy, format="XYXY", canvas_size=(h, w)),
            "labels": classes,
        }
        out = self.transform(sample)
        return out["image"].as_subclass(torch.Tensor), out["boxes"].as_subclass(torch.Tensor), out["labels"]
