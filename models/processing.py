"""Pre- and post-processing, defined once for training evaluation, the ONNX runtime and HTTP.

NumPy only (no torch, no OpenCV), so the exported runtime can ship it. The same
functions turn a frame into the network input and the network output into boxes
in the frame's pixels everywhere in the project:

* :func:`letterbox` - keep the aspect ratio, resize (bilinear), pad to a square
  input with grey (114) split evenly on both sides.
* :func:`to_input` - HWC uint8 RGB -> 1x3xHxW float32 in [0, 1].
* :func:`postprocess` - decoded predictions ``(4 + nc, A)`` (centre x/y, w, h in
  input pixels, then class scores) -> confidence filter, class-aware NMS,
  ``max_det``, boxes mapped back to the original frame and clipped to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LETTERBOX_COLOR = 114
MAX_WH = 7680  # class offset for class-aware NMS in one pass (larger than any image side)


@dataclass(frozen=True)
class LetterboxInfo:
    """How a frame was mapped into the network input: ``input = frame * ratio + (pad_x, pad_y)``."""

    ratio: float
    pad_x: float
    pad_y: float
    orig_h: int
    orig_w: int
    input_h: int
    input_w: int


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (the OpenCV INTER_LINEAR convention), uint8 in and out."""
    in_h, in_w = image.shape[:2]
    if (in_h, in_w) == (out_h, out_w):
        return image.copy()

    def axis(n_out: int, n_in: int):
        pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, wy = axis(out_h, in_h)
    x0, x1, wx = axis(out_w, in_w)
    img = image if image.ndim == 3 else image[:, :, None]
    # only the output's source pixels become float, not the whole frame: 2.7x faster for a 1080p frame letterboxed
    # to 320 px (docs/benchmarks/train_step.md)
    rows0, rows1 = img.take(y0, axis=0), img.take(y1, axis=0)

    def pixels(rows: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return rows.take(xs, axis=1).astype(np.float32)

    top = pixels(rows0, x0) * (1 - wx)[None, :, None] + pixels(rows0, x1) * wx[None, :, None]
    bottom = pixels(rows1, x0) * (1 - wx)[None, :, None] + pixels(rows1, x1) * wx[None, :, None]
    out = top * (1 - wy)[:, None, None] + bottom * wy[:, None, None]
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out if image.ndim == 3 else out[:, :, 0]


def letterbox(image: np.ndarray, size: int | tuple[int, int], color: int = LETTERBOX_COLOR) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize ``image`` (HWC uint8 RGB) into ``size`` keeping its aspect ratio, padding the rest with ``color``."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    in_h, in_w = (size, size) if isinstance(size, int) else size
    h, w = image.shape[:2]
    ratio = min(in_h / h, in_w / w)
    new_h, new_w = max(1, int(round(h * ratio))), max(1, int(round(w * ratio)))
    resized = resize_bilinear(image, new_h, new_w)
    pad_y, pad_x = (in_h - new_h) / 2, (in_w - new_w) / 2
    top, left = int(round(pad_y - 0.1)), int(round(pad_x - 0.1))
    out = np.full((in_h, in_w, 3), color, dtype=np.uint8)
    out[top : top + new_h, left : left + new_w] = resized
    return out, LetterboxInfo(ratio, float(left), float(top), h, w, in_h, in_w)


def to_input(image: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB -> 1x3xHxW float32 in [0, 1] (the network's input layout)."""
    return np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0


def preprocess(image: np.ndarray, size: int | tuple[int, int]) -> tuple[np.ndarray, LetterboxInfo]:
    """Letterbox and convert one frame; returns the network input and the mapping back."""
    boxed, info = letterbox(image, size)
    return to_input(boxed), info


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """Centre/size boxes -> corner boxes."""
    out = np.empty_like(boxes)
    half_w, half_h = boxes[:, 2] / 2, boxes[:, 3] / 2
    out[:, 0], out[:, 1] = boxes[:, 0] - half_w, boxes[:, 1] - half_h
    out[:, 2], out[:, 3] = boxes[:, 0] + half_w, boxes[:, 1] + half_h
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of corner boxes ``a (N, 4)`` and ``b (M, 4)``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def scale_boxes_to_frame(boxes: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Map corner boxes from network-input pixels back to the original frame, clipped to it."""
    out = boxes.copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - info.pad_x) / info.ratio
    out[:, [1, 3]] = (out[:, [1, 3]] - info.pad_y) / info.ratio
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, info.orig_w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, info.orig_h)
    return out


def postprocess(
    prediction: np.ndarray,
    info: LetterboxInfo | None = None,
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 300,
    max_nms: int = 30000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoded predictions of one image ``(4 + nc, A)`` -> ``(boxes xyxy (N, 4), scores (N,), class_ids (N,))``.

    Boxes are in the original frame's pixels when ``info`` is given, else in input pixels.
    """
    pred = np.asarray(prediction, dtype=np.float32)
    if pred.ndim != 2 or pred.shape[0] < 5:
        raise ValueError(f"expected predictions of shape (4 + nc, anchors), got {pred.shape}")
    class_scores = pred[4:]
    class_ids = class_scores.argmax(0)
    scores = class_scores[class_ids, np.arange(pred.shape[1])]
    mask = scores > conf
    boxes = xywh_to_xyxy(pred[:4, mask].T)
    scores, class_ids = scores[mask], class_ids[mask]
    if scores.size > max_nms:
        top = np.argsort(-scores, kind="stable")[:max_nms]
        boxes, scores, class_ids = boxes[top], scores[top], class_ids[top]
    keep = nms(boxes + (class_ids[:, None] * MAX_WH).astype(np.float32), scores, iou)[:max_det]
    boxes, scores, class_ids = boxes[keep], scores[keep], class_ids[keep]
    if info is not None:
        boxes = scale_boxes_to_frame(boxes, info)
    return boxes.astype(np.float32), scores.astype(np.float32), class_ids.astype(np.int64)
