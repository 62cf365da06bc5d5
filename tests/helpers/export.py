"""Export / runtime test helpers: comparing two sets of decoded boxes."""

from __future__ import annotations

import numpy as np

from models.processing import box_iou


def same_boxes(a, b, match_iou: float = 0.99) -> bool:
    """Same number of boxes and each box of ``a`` has a same-class box in ``b`` with IoU >= match_iou."""
    (ba, _, ca), (bb, _, cb) = a, b
    if len(ba) != len(bb):
        return False
    if not len(ba):
        return True
    iou = box_iou(np.asarray(ba, np.float32), np.asarray(bb, np.float32))
    iou[np.asarray(ca)[:, None] != np.asarray(cb)[None, :]] = 0
    return bool((iou.max(1) >= match_iou).all())
