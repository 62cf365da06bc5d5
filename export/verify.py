"""Check an exported ONNX file against the PyTorch model on real frames.

Both sides get the same input (``models.processing.preprocess``) and their
outputs go through the same ``models.processing.postprocess``; the report has
the largest raw-output difference and box-level agreement after NMS.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from models.errors import ExportError
from models.processing import box_iou, postprocess, preprocess

from export.runtime import Detector, load_image
from export.source import load_source

#: Raw-output tolerances (box coordinates in input pixels, class scores) per precision.
TOLERANCES = {
    "fp32": {"box_atol": 0.05, "score_atol": 1e-3, "min_match_rate": 1.0},
    "fp16": {"box_atol": 2.0, "score_atol": 0.02, "min_match_rate": 0.9},
}


@dataclass
class VerifyReport:
    """How closely an ONNX file reproduces the PyTorch model."""

    images: int
    max_abs_diff: float
    max_box_diff: float
    max_score_diff: float
    boxes_reference: int
    boxes_onnx: int
    matched: int
    required: int
    min_iou: float
    class_mismatches: int
    conf: float
    iou_threshold: float
    match_iou: float
    tolerance: dict[str, float] = field(default_factory=dict)
    passed: bool = False

    @property
    def match_rate(self) -> float:
        return self.matched / self.required if self.required else 1.0

    def summary(self) -> str:
        return (
            f"max |diff| boxes {self.max_box_diff:.2e} px, scores {self.max_score_diff:.2e}; "
            f"{self.matched}/{self.required} boxes matched (IoU >= {self.match_iou}, same class), "
            f"min IoU {self.min_iou:.4f}, {self.class_mismatches} class mismatches over {self.images} frames"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "match_rate": self.match_rate}


def generated_frames(seed: int = 0) -> list[np.ndarray]:
    """Two synthetic RGB frames of different sizes and aspect ratios (landscape, portrait)."""
    rng = np.random.default_rng(seed)
    frames = []
    for h, w in ((360, 640), (400, 224)):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w) + 64], -1).astype(np.uint8)
        for _ in range(6):
            y0, x0 = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
            y1, x1 = y0 + int(rng.integers(20, h // 2)), x0 + int(rng.integers(20, w // 2))
            img[y0:y1, x0:x1] = rng.integers(0, 256, 3)
        frames.append(img)
    return frames


def asset_frames() -> list[Path]:
    """The photos that ship inside the ultralytics package (bus.jpg 810x1080, zidane.jpg 1280x720)."""
    try:
        from ultralytics.utils import ASSETS
    except ImportError:  # pragma: no cover
        return []
    return [p for p in (Path(ASSETS) / "bus.jpg", Path(ASSETS) / "zidane.jpg") if p.is_file()]


def default_frames() -> list[Any]:
    return [*asset_frames(), *generated_frames()]


def match_boxes(ref, onnx_, conf: float, match_iou: float, score_margin: float) -> dict[str, Any]:
    """Each box clear of the confidence threshold on one side needs a same-class box with IoU >= match_iou on the other."""
    required = matched = mismatched = 0
    ious: list[float] = []
    for (b1, s1, c1), (b2, s2, c2) in ((ref, onnx_), (onnx_, ref)):
        keep = s1 > conf + score_margin
        if not keep.any():
            continue
        iou = box_iou(b1[keep], b2) if len(b2) else np.zeros((int(keep.sum()), 0))
        for row, cls in zip(iou, c1[keep]):
            required += 1
            same = row[c2 == cls] if len(b2) else row
            best = float(same.max()) if same.size else 0.0
            if best >= match_iou:
                matched += 1
                ious.append(best)
            elif row.size and float(row.max()) >= match_iou:
                mismatched += 1
    return {"required": required, "matched": matched, "class_mismatches": mismatched,
            "min_iou": min(ious) if ious else 1.0}


@torch.no_grad()
def verify_onnx(
    onnx_path: str | Path,
    source: Any,
    images: Sequence[Any] | None = None,
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 300,
    match_iou: float = 0.99,
    tolerance: dict[str, float] | None = None,
) -> VerifyReport:
    """Run ``onnx_path`` (onnxruntime) and ``source`` (PyTorch, eval mode) on ``images`` and compare.

    Args:
        source: a DetectionModel (adapters may still be unmerged: that is the reference), a model or run dir.
        images: frames (paths, RGB arrays, PIL images); default: ultralytics' bus.jpg / zidane.jpg + generated frames.
        tolerance: ``box_atol`` / ``score_atol`` / ``min_match_rate`` (default by the file's precision).
    """
    model, _, _ = load_source(source)
    detector = Detector(onnx_path)
    frames = [load_image(im) for im in (default_frames() if images is None else images)]
    if not frames:
        raise ExportError("verify_onnx needs at least one image")
    precision = detector.metadata.get("precision", "fp32")
    tol = {**TOLERANCES.get(precision, TOLERANCES["fp16"]), **(tolerance or {})}
    was_training = model.training
    model.eval()
    box_diff = score_diff = 0.0
    totals = {"required": 0, "matched": 0, "class_mismatches": 0}
    min_iou = 1.0
    n_ref = n_onnx = 0
    try:
        param = next(model.parameters())
        for frame in frames:
            x, info = preprocess(frame, detector.imgsz)
            ref = model(torch.from_numpy(x).to(device=param.device, dtype=torch.float32))
            ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).float().cpu().numpy()[0]
            out = detector.raw(x)[0]
            if out.shape != ref.shape:
                raise ExportError(f"the ONNX output has shape {out.shape} but PyTorch gives {ref.shape}; export again")
            box_diff = max(box_diff, float(np.abs(out[:4] - ref[:4]).max()))
            score_diff = max(score_diff, float(np.abs(out[4:] - ref[4:]).max()))
            a = postprocess(ref, info, conf=conf, iou=iou, max_det=max_det)
            b = postprocess(out, info, conf=conf, iou=iou, max_det=max_det)
            n_ref, n_onnx = n_ref + len(a[0]), n_onnx + len(b[0])
            # boxes within the score tolerance of the threshold may fairly fall on either side of it
            m = match_boxes(a, b, conf, match_iou, score_margin=tol["score_atol"])
            for key in totals:
                totals[key] += m[key]
            min_iou = min(min_iou, m["min_iou"])
    finally:
        model.train(was_training)
    report = VerifyReport(
        images=len(frames), max_abs_diff=max(box_diff, score_diff), max_box_diff=box_diff, max_score_diff=score_diff,
        boxes_reference=n_ref, boxes_onnx=n_onnx, matched=totals["matched"], required=totals["required"],
        min_iou=min_iou, class_mismatches=totals["class_mismatches"], conf=conf, iou_threshold=iou,
        match_iou=match_iou, tolerance=tol,
    )
    report.passed = (
        box_diff <= tol["box_atol"] and score_diff <= tol["score_atol"] and report.match_rate >= tol["min_match_rate"]
    )
    return report
