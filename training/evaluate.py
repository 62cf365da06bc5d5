"""Evaluation in mAP: mAP50, mAP50-95 (COCO definition, 101-point), per-class AP, precision / recall.

Predictions go through the same post-processing as the runtime and HTTP
(``models.processing.postprocess`` with ``conf=0.001, iou=0.7, max_det=300``) and
are compared, in original-frame pixels, with the dataset's ``orig_xyxy`` ground
truth. Matching (greedy by confidence at ten IoU thresholds 0.50:0.95) and the AP
computation are ultralytics' own (``box_iou``, ``ap_per_class``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from models.processing import postprocess

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
EVAL_CONF, EVAL_IOU, EVAL_MAX_DET = 0.001, 0.7, 300


def match_predictions(
    pred_boxes: np.ndarray, pred_cls: np.ndarray, gt_boxes: np.ndarray, gt_cls: np.ndarray
) -> np.ndarray:
    """``(N, 10)`` bool: whether each prediction (sorted by falling confidence) is a true positive per IoU threshold.

    Greedy in confidence order, one ground-truth box per prediction and threshold,
    same class only (ultralytics' ``match_predictions``).
    """
    from ultralytics.utils.metrics import box_iou

    correct = np.zeros((len(pred_boxes), len(IOU_THRESHOLDS)), dtype=bool)
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return correct
    iou = box_iou(torch.as_tensor(gt_boxes, dtype=torch.float32), torch.as_tensor(pred_boxes, dtype=torch.float32)).numpy()
    iou = iou * (gt_cls[:, None] == pred_cls[None, :])
    matched = np.zeros((iou.shape[0], len(IOU_THRESHOLDS)), dtype=bool)
    cols = np.arange(len(IOU_THRESHOLDS))
    for j in np.flatnonzero((iou >= IOU_THRESHOLDS.min()).any(0)):
        available = np.where(matched, 0, iou[:, j, None])
        k = available.argmax(0)
        correct[j] = available[k, cols] >= IOU_THRESHOLDS
        matched[k, cols] |= correct[j]
    return correct


@dataclass
class DetectionStats:
    """Accumulates per-image predictions and ground truth; :meth:`compute` gives the metrics."""

    names: Sequence[str]
    tp: list[np.ndarray] = field(default_factory=list)
    conf: list[np.ndarray] = field(default_factory=list)
    pred_cls: list[np.ndarray] = field(default_factory=list)
    target_cls: list[np.ndarray] = field(default_factory=list)
    images: int = 0

    def update(self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, gt_boxes: np.ndarray, gt_cls: np.ndarray) -> None:
        """Add one image: predicted ``xyxy`` boxes / scores / class ids and ground-truth ``xyxy`` boxes / class ids."""
        order = np.argsort(-np.asarray(scores), kind="stable")
        boxes, scores, classes = np.asarray(boxes)[order], np.asarray(scores)[order], np.asarray(classes)[order]
        gt_boxes = np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4)
        gt_cls = np.asarray(gt_cls).reshape(-1).astype(np.int64)
        self.tp.append(match_predictions(boxes.reshape(-1, 4), classes.astype(np.int64), gt_boxes, gt_cls))
        self.conf.append(scores.astype(np.float64))
        self.pred_cls.append(classes.astype(np.int64))
        self.target_cls.append(gt_cls)
        self.images += 1

    def compute(self, plot_path: str | Path | None = None) -> dict[str, Any]:
        """mAP50, mAP50-95, mean precision / recall (at the max-F1 confidence) and per-class values.

        Classes without ground truth are left out of the means (as COCO does).
        """
        from ultralytics.utils.metrics import ap_per_class

        tp = np.concatenate(self.tp) if self.tp else np.zeros((0, 10), bool)
        conf = np.concatenate(self.conf) if self.conf else np.zeros(0)
        pred_cls = np.concatenate(self.pred_cls) if self.pred_cls else np.zeros(0, np.int64)
        target_cls = np.concatenate(self.target_cls) if self.target_cls else np.zeros(0, np.int64)
        result: dict[str, Any] = {
            "map50": 0.0, "map50_95": 0.0, "precision": 0.0, "recall": 0.0,
            "images": self.images, "instances": int(len(target_cls)), "per_class": {},
        }
        if len(target_cls) == 0:
            return result
        names = {i: n for i, n in enumerate(self.names)}
        _, _, p, r, _, ap, classes, _, _, _, x, prec_values = ap_per_class(tp, conf, pred_cls, target_cls, names=names)
        result.update(
            map50=float(ap[:, 0].mean()), map50_95=float(ap.mean()), precision=float(p.mean()), recall=float(r.mean())
        )
        counts = np.bincount(target_cls, minlength=len(self.names))
        for i, c in enumerate(classes):
            result["per_class"][str(self.names[c]) if c < len(self.names) else str(c)] = {
                "ap50": float(ap[i, 0]), "ap50_95": float(ap[i].mean()),
                "precision": float(p[i]), "recall": float(r[i]), "instances": int(counts[c]),
            }
        if plot_path is not None:
            from training.plots import plot_pr_curve

            labels = [str(self.names[c]) if c < len(self.names) else str(c) for c in classes]
            plot_pr_curve(x, prec_values, ap[:, 0], labels, plot_path)
        return result


@runtime_checkable
class Evaluable(Protocol):
    """What :func:`evaluate` reads of a model besides running it: a DetectionModel, or ``export.evaluate.OnnxModule``."""

    names: dict[int, str]
    imgsz: int

    @property
    def nc(self) -> int: ...


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    split: str = "val",
    imgsz: int | None = None,
    batch: int = 16,
    conf: float = EVAL_CONF,
    iou: float = EVAL_IOU,
    max_det: int = EVAL_MAX_DET,
    plot_path: str | Path | None = None,
    quiet: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on a dataset (a data.yaml / COCO json path, or a built dataset).

    Returns ``{"map50", "map50_95", "precision", "recall", "images", "instances", "per_class": {name: {...}}}``.
    ``plot_path`` writes the precision-recall PNG. The model's train/eval mode is restored afterwards.
    """
    from tqdm import tqdm

    from training.data import build_dataset, collate

    model_ = _unwrap(model)
    if not isinstance(model_, Evaluable):
        from models.errors import ConfigError

        raise ConfigError(f"evaluate needs a detector with names, nc and imgsz, not a {type(model_).__name__}")
    if isinstance(data, (str, Path)):
        data = build_dataset(str(data), split=split, imgsz=int(imgsz or model_.imgsz), augment=False)
    model_names = [model_.names[i] for i in range(model_.nc)]
    names = list(getattr(data, "names", None) or model_names)
    if names != model_names:
        from models.errors import ConfigError

        raise ConfigError(f"the dataset's classes {names} are not the model's {model_names}; evaluate on a dataset "
                          "with the model's classes (or fine-tune with new_classes first)")
    device = torch.device(device) if device is not None else next(model_.parameters()).device
    stats = DetectionStats(names)
    was_training = model_.training
    model_.eval()
    try:
        loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False, collate_fn=collate, num_workers=0)
        for b in tqdm(loader, desc="eval", leave=False, disable=quiet, unit="batch"):
            preds = model_(b["img"].to(device).float() / 255.0)
            preds = (preds[0] if isinstance(preds, (tuple, list)) else preds).float().cpu().numpy()
            for i in range(len(preds)):
                boxes, scores, classes = postprocess(preds[i], b["letterbox"][i], conf=conf, iou=iou, max_det=max_det)
                gt_boxes = np.asarray(b["orig_xyxy"][i], dtype=np.float32).reshape(-1, 4)
                gt_cls = (b["cls"][b["batch_idx"] == i]).view(-1).numpy().astype(np.int64)
                stats.update(boxes, scores, classes, gt_boxes, gt_cls)
    finally:
        model_.train(was_training)
    return stats.compute(plot_path=plot_path)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """A small table: one line per class, then all classes."""
    lines = [f"{'class':<16} {'images':>6} {'inst':>6} {'P':>6} {'R':>6} {'AP50':>6} {'AP50-95':>8}"]
    for name, m in metrics.get("per_class", {}).items():
        lines.append(
            f"{name:<16} {'':>6} {m['instances']:>6} {m['precision']:>6.3f} {m['recall']:>6.3f} {m['ap50']:>6.3f} {m['ap50_95']:>8.3f}"
        )
    lines.append(
        f"{'all':<16} {metrics['images']:>6} {metrics['instances']:>6} {metrics['precision']:>6.3f} "
        f"{metrics['recall']:>6.3f} {metrics['map50']:>6.3f} {metrics['map50_95']:>8.3f}"
    )
    return "\n".join(lines)
