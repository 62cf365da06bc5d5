"""Our mAP (ultralytics' matching + AP) against pycocotools' COCOeval on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate import DetectionStats, match_predictions


def _scene(rng: np.random.Generator, n_images: int = 40, nc: int = 4):
    images = []
    for _ in range(n_images):
        h, w = 240, 320
        k = int(rng.integers(1, 7))
        xy = rng.uniform([0, 0], [w - 60, h - 60], size=(k, 2))
        wh = rng.uniform(12, 60, size=(k, 2))
        gt = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        gt_cls = rng.integers(0, nc, size=k)
        preds, scores, classes = [], [], []
        for box, c in zip(gt, gt_cls):
            if rng.random() < 0.15:  # missed
                continue
            size = box[2:] - box[:2]
            jitter = rng.normal(0, rng.choice([0.03, 0.08, 0.2]), size=4) * np.r_[size, size]
            preds.append(box + jitter)
            scores.append(rng.uniform(0.2, 1.0))
            classes.append(c if rng.random() > 0.1 else (c + 1) % nc)
            if rng.random() < 0.2:  # duplicate
                preds.append(box + rng.normal(0, 3, size=4))
                scores.append(rng.uniform(0.01, 0.5))
                classes.append(c)
        for _ in range(int(rng.integers(0, 4))):  # false positives
            xy0 = rng.uniform([0, 0], [w - 40, h - 40])
            preds.append(np.r_[xy0, xy0 + rng.uniform(10, 40, 2)])
            scores.append(rng.uniform(0.001, 0.7))
            classes.append(int(rng.integers(0, nc)))
        p = np.asarray(preds, np.float32).reshape(-1, 4)
        p[:, 2:] = np.maximum(p[:, 2:], p[:, :2] + 1)
        images.append((h, w, gt, gt_cls, p, np.asarray(scores, np.float32), np.asarray(classes, np.int64)))
    return images


def _coco_map(images, nc):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": c + 1, "name": str(c)} for c in range(nc)]}
    dets = []
    for i, (h, w, boxes, cls, p, s, pc) in enumerate(images):
        gt["images"].append({"id": i + 1, "height": h, "width": w})
        for b, c in zip(boxes, cls):
            bw, bh = float(b[2] - b[0]), float(b[3] - b[1])
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                                      "bbox": [float(b[0]), float(b[1]), bw, bh], "area": bw * bh, "iscrowd": 0})
        for b, sc, c in zip(p, s, pc):
            dets.append({"image_id": i + 1, "category_id": int(c) + 1, "score": float(sc),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[1]), float(ev.stats[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_map_matches_pycocotools(seed):
    nc = 4
    images = _scene(np.random.default_rng(seed), nc=nc)
    stats = DetectionStats([f"c{i}" for i in range(nc)])
    for h, w, gt, gt_cls, p, s, pc in images:
        stats.update(p, s, pc, gt, gt_cls)
    ours = stats.compute()
    coco50, coco = _coco_map(images, nc)
    assert 0.2 < ours["map50_95"] < 0.95  # a non-trivial case
    assert abs(ours["map50"] - coco50) < 0.01, (ours["map50"], coco50)
    assert abs(ours["map50_95"] - coco) < 0.01, (ours["map50_95"], coco)
    assert set(ours["per_class"]) == {f"c{i}" for i in range(nc)}


def test_perfect_predictions_score_one_and_pr_plot(tmp_path):
    gt = np.array([[10, 10, 50, 60], [100, 80, 160, 120]], np.float32)
    stats = DetectionStats(["a", "b"])
    stats.update(gt.copy(), np.array([0.9, 0.8]), np.array([0, 1]), gt, np.array([0, 1]))
    out = stats.compute(plot_path=tmp_path / "pr.png")
    assert out["map50"] == pytest.approx(1.0, abs=0.01) and out["map50_95"] == pytest.approx(1.0, abs=0.01)
    assert (tmp_path / "pr.png").stat().st_size > 1000


def test_matching_one_prediction_per_ground_truth():
    gt = np.array([[0, 0, 10, 10]], np.float32)
    preds = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    correct = match_predictions(preds, np.array([0, 0]), gt, np.array([0]))
    assert correct[0].all() and not correct[1].any()
    wrong_class = match_predictions(preds[:1], np.array([1]), gt, np.array([0]))
    assert not wrong_class.any()
