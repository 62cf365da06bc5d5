"""The glasses runtime: an exported ONNX detector run with onnxruntime and NumPy alone.

Imports neither torch nor ultralytics. Pre- and post-processing are
``models.processing`` (the same code training evaluation uses), and the class
names and input size come from the file's metadata.

    >>> from export.runtime import Detector
    >>> det = Detector("kitchen.onnx")
    >>> for d in det.detect("frame.jpg"):
    ...     print(d.class_name, d.score, d.box)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort

from models.images import read_rgb, to_rgb8, upright
from models.errors import CheckpointError, DataError
from models.processing import postprocess, preprocess

from export.metadata import parse_metadata


@dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` is ``(x1, y1, x2, y2)`` in the original frame's pixels."""

    box: tuple[float, float, float, float]
    score: float
    class_id: int
    class_name: str

    def to_dict(self) -> dict[str, Any]:
        return {"box": list(self.box), "score": self.score, "class_id": self.class_id, "class_name": self.class_name}


def load_image(image: Any) -> np.ndarray:
    """An RGB HWC uint8 array from an array (RGB; gray and RGBA accepted), a PIL image or a file path.

    Images and files come upright (their EXIF orientation applied), as OpenCV and ultralytics read them.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise DataError(f"image {path} does not exist")
        try:
            from PIL import UnidentifiedImageError
        except ImportError:  # pragma: no cover - Pillow is optional on the glasses
            raise DataError("decoding image files needs Pillow; pass an RGB numpy array instead") from None
        try:
            return read_rgb(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot decode {path} as an image ({exc}); pass a JPEG/PNG file or an RGB array") from None
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image: upright, as ultralytics' predictor takes it
        return to_rgb8(upright(image))
    if not isinstance(image, np.ndarray):
        raise DataError(f"expected an RGB numpy array, a PIL image or a path, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise DataError(f"expected an HxWx3 RGB image, got an array of shape {image.shape}")
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.size and float(np.nanmax(image)) <= 1.0:
            image = image * 255.0
        image = np.clip(np.nan_to_num(image), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


class Detector:
    """An exported detector in one onnxruntime session.

    Args:
        path: the ``.onnx`` file written by ``export.export_onnx`` (or ``quantize_onnx``).
        providers: onnxruntime execution providers (default: CPU).
        threads: intra-op threads (``None``: onnxruntime's default).
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"no ONNX file at {self.path}; export one with `glasses-vision export`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as exc:  # onnxruntime raises its own types for unreadable / invalid graphs
            raise CheckpointError(
                f"{self.path} is not a loadable ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "the file is corrupt or incomplete - export it again"
            ) from None
        self.metadata = parse_metadata(self.session.get_modelmeta().custom_metadata_map, where=str(self.path))
        self.names: list[str] = self.metadata["names"]
        self.imgsz: tuple[int, int] = self.metadata["imgsz"]
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        #: The file's fixed batch size (1 for the default glasses export), or None for a dynamic batch axis.
        self.batch_size: int | None = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None

    def __repr__(self) -> str:
        return f"Detector({str(self.path)!r}, imgsz={self.imgsz}, classes={len(self.names)})"

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """Network output ``(B, 4 + nc, A)`` for a preprocessed float input ``(B, 3, H, W)``.

        A file with a fixed batch size takes any ``B``: the frames run in chunks of that size.
        """
        batch = batch.astype(self.input_dtype, copy=False)
        fixed = self.batch_size
        if fixed is None or batch.shape[0] == fixed:
            return np.asarray(self.session.run(None, {self.input_name: batch})[0], dtype=np.float32)
        if batch.shape[0] % fixed:
            raise DataError(f"{self.path} takes batches of {fixed} frames, got {batch.shape[0]}; "
                            "export it with --dynamic-batch to run any batch size")
        outs = [self.session.run(None, {self.input_name: batch[i : i + fixed]})[0] for i in range(0, batch.shape[0], fixed)]
        return np.concatenate(outs).astype(np.float32, copy=False)

    def detect(self, image: Any, conf: float = 0.25, iou: float = 0.45, max_det: int = 300) -> list[Detection]:
        """Detections in one frame (an RGB HWC array, a PIL image or an image path), in its own pixels."""
        return detect_frame(self.raw, load_image(image), self.imgsz, self.names, conf=conf, iou=iou, max_det=max_det)


def detect_frame(
    raw: Callable[[np.ndarray], np.ndarray],
    frame: np.ndarray,
    imgsz: tuple[int, int],
    names: Sequence[str],
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 300,
) -> list[Detection]:
    """The one path from a frame to detections: letterbox, ``raw`` (the network), NMS, boxes in frame pixels.

    ``raw`` maps a ``(1, 3, H, W)`` float input to the decoded output ``(1, 4 + nc, A)``: an onnxruntime
    session (:meth:`Detector.raw`) or a PyTorch model (``glasses-vision predict`` on a model directory).
    """
    x, info = preprocess(frame, imgsz)
    pred = np.asarray(raw(x), dtype=np.float32)[0]
    boxes, scores, classes = postprocess(pred, info, conf=conf, iou=iou, max_det=max_det)
    return [
        Detection(
            box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
            score=float(s),
            class_id=int(c),
            class_name=names[int(c)] if int(c) < len(names) else str(int(c)),
        )
        for b, s, c in zip(boxes, scores, classes)
    ]
