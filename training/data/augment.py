"""Box-aware training augmentation with torchvision.transforms.v2 (flip, colour jitter, scale/translate)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

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
    """Applies one random augmentation to a letterboxed image and its ``xyxy`` pixel boxes.

    The image is a PIL RGB image or a ``uint8 3xSxS`` tensor; the result is a ``uint8 3xSxS`` tensor.
    The transforms run on the PIL image, with one torch thread (as in a DataLoader worker): torchvision's
    PIL kernels are single C calls, while its tensor kernels are dozens of small torch ops per image
    (colour jitter's hue step converts to HSV in float), 10-100x slower on one training frame, and with
    several intra-op threads ``torch.aminmax`` (the box affine) and the copy of one frame wake the thread
    pool for microseconds of work, which costs milliseconds on a busy machine. These were the largest
    cost of a CPU training step after the model itself (docs/benchmarks/train_step.md).
    """

    def __init__(self, config: AugmentConfig | None = None):
        c = config or AugmentConfig()
        self.config = c
        self.transform = v2.Compose([
            v2.RandomHorizontalFlip(p=c.fliplr),
            ColorJitter(brightness=c.brightness, contrast=c.contrast, saturation=c.saturation, hue=c.hue),
            v2.RandomAffine(degrees=c.degrees, translate=(c.translate, c.translate), scale=c.scale, fill=LETTERBOX_COLOR),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=c.min_box),
        ])

    def __call__(self, image: Image.Image | torch.Tensor, boxes_xyxy: torch.Tensor,
                 classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pil = F.to_pil_image(image) if isinstance(image, torch.Tensor) else image
        sample = {
            "image": pil,
            "boxes": tv_tensors.BoundingBoxes(boxes_xyxy, format="XYXY", canvas_size=(pil.height, pil.width)),
            "labels": classes,
        }
        with single_thread():
            out = self.transform(sample)
        # numpy makes the CHW copy: a torch copy of one frame would wake the intra-op thread pool again
        image = torch.from_numpy(np.ascontiguousarray(np.asarray(out["image"]).transpose(2, 0, 1)))
        return image, out["boxes"].as_subclass(torch.Tensor), out["labels"]


class ColorJitter(v2.ColorJitter):
    """torchvision's ``ColorJitter`` (same settings, same random draws, same random order of the four
    adjustments), done on a PIL frame with OpenCV and lookup tables: ~0.1 ms instead of ~1.3 ms per
    128 px frame, half of which was the PIL hue step's two HSV conversions. Tensors go to torchvision."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, Image.Image) or inpt.mode != "RGB":
            return super().transform(inpt, params)
        image = np.asarray(inpt)
        for fn_id in params["fn_idx"].tolist():
            if fn_id == 0 and params["brightness_factor"] is not None:
                image = _blend_with_constant(image, 0.0, params["brightness_factor"])
            elif fn_id == 1 and params["contrast_factor"] is not None:
                mean = float(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).mean())
                image = _blend_with_constant(image, mean, params["contrast_factor"])
            elif fn_id == 2 and params["saturation_factor"] is not None:
                gray = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
                factor = params["saturation_factor"]
                image = cv2.addWeighted(image, factor, gray, 1.0 - factor, 0.0)
            elif fn_id == 3 and params["hue_factor"] is not None:
                hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)  # hue as 0-255 around the circle, as PIL's HSV
                hsv[..., 0] += np.uint8(round(params["hue_factor"] * 255) % 256)  # uint8 addition wraps around
                image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
        return Image.fromarray(image)


def _blend_with_constant(image: np.ndarray, other: float, factor: float) -> np.ndarray:
    """``factor * image + (1 - factor) * other``, rounded and clipped to uint8 (one lookup table)."""
    table = np.clip(np.rint(np.arange(256) * factor + (1.0 - factor) * other), 0, 255).astype(np.uint8)
    return cv2.LUT(image, table)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread, then restore the thread count."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
