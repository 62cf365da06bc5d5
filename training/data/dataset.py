"""One dataset interface for YOLO and COCO data: letterboxed images, boxes, a collate for batches.

``ds[i]`` gives the sample dict of docs/ARCHITECTURE.md; :func:`collate` stacks
samples into the batch that ultralytics' ``v8DetectionLoss`` takes (``img``,
``cls``, ``bboxes`` as normalised ``cx cy w h``, ``batch_idx``). Without
augmentation the image is exactly ``models.processing.letterbox`` of the file and
the boxes are exactly the file's boxes mapped through the same letterbox.

Bad data: with ``strict=True`` the first problem raises :class:`DataError` naming
the file and line; with ``strict=False`` each image with a problem is skipped
and recorded in ``ds.problems`` (``ds.skipped`` counts them). A dataset with no
usable image is always an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import UnidentifiedImageError

from models.images import read_rgb
from models.errors import DataError
from models.processing import LetterboxInfo, letterbox
from training.data.augment import AugmentConfig, DetectionAugment


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with a dataset: the file, the line (1-based, 0 for the whole file) and what."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        where = f"{self.file} line {self.line}" if self.line else self.file
        return f"{where}: {self.message}"


@dataclass
class Record:
    """One image and its labels: boxes either normalised ``cx cy w h`` or pixel ``x y w h`` (COCO)."""

    im_file: Path
    cls: np.ndarray  # (n,) int64
    boxes: np.ndarray  # (n, 4) float32
    normalized: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


def load_image(path: Path) -> np.ndarray:
    """The image as HxWx3 uint8 RGB; a missing, unreadable or truncated file raises :class:`DataError`."""
    try:
        return read_rgb(path)
    except FileNotFoundError:
        raise DataError(f"{path}: image file is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: image cannot be decoded ({exc}); replace or remove it") from None


def check_image(path: Path) -> DataProblem | None:
    try:
        load_image(path)
    except DataError as exc:
        return DataProblem(str(path), 0, str(exc).split(": ", 1)[1])
    return None


class DetectionDataset(torch.utils.data.Dataset):
    """Records -> letterboxed samples; subclasses build ``self.records`` (see :mod:`training.data.yolo`, ``coco``)."""

    def __init__(self, records: list[Record], names: list[str], imgsz: int = 320, augment: bool | AugmentConfig = False,
                 problems: list[DataProblem] | None = None, source: str = ""):
        self.records = records
        self.names = list(names)
        self.nc = len(self.names)
        self.imgsz = int(imgsz)
        self.problems = list(problems or [])
        self.source = source
        self.augment: DetectionAugment | None = None
        if augment:
            self.augment = DetectionAugment(augment if isinstance(augment, AugmentConfig) else None)
        if not self.records:
            detail = f" ({len(self.problems)} skipped: {self.problems[0]})" if self.problems else ""
            raise DataError(f"dataset {source} has no usable images{detail}; check the split paths and the files")

    @property
    def skipped(self) -> int:
        """How many images were left out because of a problem."""
        return len({p.file for p in self.problems})

    def __len__(self) -> int:
        return len(self.records)

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Classes and normalised ``cx cy w h`` of record ``i`` without loading the image (YOLO) or from its size (COCO)."""
        r = self.records[i]
        if r.normalized:
            return r.cls, r.boxes
        w, h = r.meta["width"], r.meta["height"]
        b = r.boxes.astype(np.float64)
        xywh = np.stack([(b[:, 0] + b[:, 2] / 2) / w, (b[:, 1] + b[:, 3] / 2) / h, b[:, 2] / w, b[:, 3] / h], 1)
        return r.cls, xywh.astype(np.float32).reshape(-1, 4)

    @staticmethod
    def to_pixels(r: Record, h: int, w: int) -> np.ndarray:
        """Record boxes as corner pixels in the original image, clipped to it."""
        b = r.boxes.astype(np.float64)
        if r.normalized:
            xyxy = np.stack([(b[:, 0] - b[:, 2] / 2) * w, (b[:, 1] - b[:, 3] / 2) * h,
                             (b[:, 0] + b[:, 2] / 2) * w, (b[:, 1] + b[:, 3] / 2) * h], 1)
        else:
            xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)
        xyxy = xyxy.reshape(-1, 4)
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, w)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, h)
        return xyxy.astype(np.float32)

    def _letterboxed(self, i: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, LetterboxInfo, np.ndarray]:
        """Record ``i`` letterboxed to ``size``: image, classes, boxes (input pixels), info, boxes (original pixels)."""
        r = self.records[i]
        image = load_image(r.im_file)
        orig = self.to_pixels(r, *image.shape[:2])
        boxed, info = letterbox(image, size)
        boxes = orig * info.ratio + np.array([info.pad_x, info.pad_y, info.pad_x, info.pad_y], np.float32)
        return boxed, r.cls.astype(np.int64), boxes.astype(np.float32), info, orig

    def _mosaic(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, LetterboxInfo, np.ndarray]:
        """Sample ``i`` and three random others, each letterboxed to half size, in a 2x2 grid."""
        S, half = self.imgsz, self.imgsz // 2
        others = torch.randint(len(self), (3,)).tolist()
        canvas = np.full((S, S, 3), 114, np.uint8)
        all_cls, all_boxes = [], []
        for (ox, oy), j in zip([(0, 0), (half, 0), (0, half), (half, half)], [i, *others]):
            img, cls, boxes, _, _ = self._letterboxed(j, half)
            canvas[oy : oy + half, ox : ox + half] = img
            all_cls.append(cls)
            all_boxes.append(boxes + np.array([ox, oy, ox, oy], np.float32))
        info = LetterboxInfo(1.0, 0.0, 0.0, S, S, S, S)
        boxes = np.concatenate(all_boxes)
        return canvas, np.concatenate(all_cls), boxes, info, boxes.copy()

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        cfg = self.augment.config if self.augment is not None else None
        if cfg is not None and cfg.mosaic > 0 and float(torch.rand(())) < cfg.mosaic:
            boxed, cls_np, boxes, info, orig = self._mosaic(i)
        else:
            boxed, cls_np, boxes, info, orig = self._letterboxed(i, self.imgsz)
        h, w = info.orig_h, info.orig_w
        if self.augment is not None:
            boxed, boxes, cls_np = self.augment(boxed, boxes, cls_np)
            orig = (boxes - np.array([info.pad_x, info.pad_y] * 2, np.float32)) / info.ratio
            orig[:, [0, 2]] = orig[:, [0, 2]].clip(0, w)
            orig[:, [1, 3]] = orig[:, [1, 3]].clip(0, h)
        # numpy, not torch, for the per-frame arithmetic: tiny torch ops wake the intra-op thread pool, which
        # costs milliseconds on a machine busy training (docs/benchmarks/train_step.md)
        xyxy = boxes.astype(np.float32).reshape(-1, 4)
        cxcywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                           xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1) / np.float32(self.imgsz)
        return {
            "img": torch.from_numpy(np.ascontiguousarray(boxed.transpose(2, 0, 1))),
            "cls": torch.from_numpy(cls_np.astype(np.float32).reshape(-1, 1)),
            "bboxes": torch.from_numpy(cxcywh.astype(np.float32)),
            "im_file": str(r.im_file),  # a mosaic names its first image; its orig_xyxy are mosaic pixels
            "ori_shape": (h, w),
            "letterbox": info,
            "orig_xyxy": torch.from_numpy(orig.astype(np.float32).reshape(-1, 4)),
        }

    def summary(self) -> dict[str, Any]:
        """Counts for reports: images, boxes, boxes per class, skipped images and problems."""
        per_class = np.zeros(self.nc, np.int64)
        n_boxes = empty = 0
        for r in self.records:
            per_class += np.bincount(r.cls, minlength=self.nc)[: self.nc]
            n_boxes += len(r.cls)
            empty += len(r.cls) == 0
        return {"images": len(self.records), "boxes": int(n_boxes), "background_images": int(empty),
                "per_class": {n: int(c) for n, c in zip(self.names, per_class)},
                "skipped": self.skipped, "problems": [str(p) for p in self.problems]}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into one batch in ultralytics' detection format (``batch_idx`` says whose box it is)."""
    if not samples:
        raise DataError("cannot collate an empty batch")
    batch_idx = torch.cat([torch.full((len(s["cls"]),), float(i)) for i, s in enumerate(samples)])
    return {
        "img": torch.stack([s["img"] for s in samples]),
        "cls": torch.cat([s["cls"] for s in samples]).view(-1, 1),
        "bboxes": torch.cat([s["bboxes"] for s in samples]).view(-1, 4),
        "batch_idx": batch_idx,
        "im_file": [s["im_file"] for s in samples],
        "ori_shape": [s["ori_shape"] for s in samples],
        "letterbox": [s["letterbox"] for s in samples],
        "orig_xyxy": [s["orig_xyxy"] for s in samples],
    }


__all__ = ["DetectionDataset", "Record", "collate", "load_image", "LetterboxInfo"]
