"""Box-aware training augmentation: horizontal flip, colour jitter, scale / translate / rotate.

The random draws are torchvision's own (``v2.RandomHorizontalFlip``'s coin, ``v2.ColorJitter.make_params`` and
``v2.RandomAffine.make_params``, in the order ``v2.Compose`` of those three would make them), so a seed gives
torchvision's augmentation and the global torch RNG, which checkpoints save, is all that a resumed run needs.
The pixel work is OpenCV on the uint8 frame and the box work is numpy: torchvision's ``Compose`` of the same
transforms on a PIL frame took 1.27-1.30 ms per 128 px frame, much of it in its per-transform dispatch (pytree
flattening, type checks) and its tensor box kernels; this takes 0.48-0.49 ms (docs/benchmarks/train_step.md).
tests/test_data_augment.py checks frames, boxes and labels against torchvision's pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
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
    """One random augmentation of a letterboxed frame and its ``xyxy`` pixel boxes.

    ``augment(image, boxes, classes)`` takes an ``HxWx3`` uint8 RGB array, ``(n, 4)`` boxes and ``(n,)`` labels
    and returns the new frame (same size), the boxes moved with its pixels (clamped to the frame) and the labels
    of the boxes that stay at least ``min_box`` pixels wide and high (and one square pixel in area).
    """

    def __init__(self, config: AugmentConfig | None = None):
        c = config or AugmentConfig()
        self.config = c
        # used for their settings' checks and their random draws only; the pixels are ours
        self.jitter = v2.ColorJitter(brightness=c.brightness, contrast=c.contrast, saturation=c.saturation, hue=c.hue)
        self.affine = v2.RandomAffine(degrees=c.degrees, translate=(c.translate, c.translate), scale=c.scale)

    def __call__(self, image: np.ndarray, boxes: np.ndarray,
                 classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        height, width = image.shape[:2]
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        classes = np.asarray(classes)
        if float(torch.rand(1)) < self.config.fliplr:
            image = cv2.flip(image, 1)
            boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
        image = color_jitter(image, self.jitter.make_params([]))
        canvas = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width))
        params = self.affine.make_params([canvas])  # only its canvas size is read
        matrix = affine_matrix((width * 0.5, height * 0.5), params["angle"], params["translate"], params["scale"])
        if not np.array_equal(matrix, IDENTITY):
            image = warp_nearest(image, matrix)
            boxes = affine_boxes(boxes, matrix)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = box_keep_mask(boxes, self.config.min_box)
        return image, boxes[keep].astype(np.float32), classes[keep]


IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def affine_matrix(center: tuple[float, float], angle: float, translate: tuple[float, float],
                  scale: float) -> np.ndarray:
    """The 2x3 map from input to output pixel coordinates of torchvision's ``affine`` (no shear): rotate by
    ``angle`` degrees and scale by ``scale`` about ``center``, then shift by ``translate``."""
    rot = math.radians(angle)
    a, b = math.cos(rot) * scale, -math.sin(rot) * scale
    c, d = math.sin(rot) * scale, math.cos(rot) * scale
    cx, cy = center
    tx, ty = translate
    return np.array([[a, b, cx + tx - a * cx - b * cy], [c, d, cy + ty - c * cx - d * cy]])


def warp_nearest(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``image`` moved by ``matrix`` (input -> output pixels), nearest neighbour, new area letterbox grey.

    Pillow (torchvision's PIL path) samples output pixel ``p`` at the input point ``M⁻¹(p + ½)`` and floors it;
    OpenCV's nearest warp rounds ``M'(p)``. With ``M' = M⁻¹`` shifted by ``M⁻¹``'s linear part of ``(½, ½)`` minus
    ``½`` both pick the same pixel (up to OpenCV's 1/1024 fixed-point steps at exact pixel edges).
    """
    inverse = cv2.invertAffineTransform(matrix)
    inverse[:, 2] += inverse[:, :2].sum(1) * 0.5 - 0.5
    height, width = image.shape[:2]
    return cv2.warpAffine(image, inverse, (width, height), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(LETTERBOX_COLOR,) * 3)


def affine_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The boxes around each box's four corners moved by ``matrix`` (as torchvision's ``affine`` of boxes)."""
    corners = boxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2).astype(np.float64)
    moved = corners @ matrix[:, :2].T + matrix[:, 2]
    return np.concatenate([moved.min(1), moved.max(1)], 1).astype(np.float32)


def box_keep_mask(boxes: np.ndarray, min_size: float, min_area: float = 1.0) -> np.ndarray:
    """Boxes at least ``min_size`` wide and high and ``min_area`` in area (``v2.SanitizeBoundingBoxes``' test
    for boxes already clamped to the frame)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return (w >= min_size) & (h >= min_size) & (w * h >= min_area)


def color_jitter(image: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """torchvision's ``ColorJitter`` of an RGB uint8 frame with the draws ``params`` (``v2.ColorJitter.make_params``):
    the same four adjustments in the same random order, with OpenCV lookup tables and colour conversions (~0.1 ms
    per 128 px frame against ~1.3 ms for torchvision's PIL path, half of which was its hue step's HSV round trip)."""
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
    return image


def _blend_with_constant(image: np.ndarray, other: float, factor: float) -> np.ndarray:
    """``factor * image + (1 - factor) * other``, rounded and clipped to uint8 (one lookup table)."""
    table = np.clip(np.rint(np.arange(256) * factor + (1.0 - factor) * other), 0, 255).astype(np.uint8)
    return cv2.LUT(image, table)
