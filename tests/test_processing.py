"""models.processing: letterbox geometry, resize, NMS and the mapping back to frame pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import nms as tv_nms

from models.processing import box_iou, letterbox, nms, postprocess, resize_bilinear, scale_boxes_to_frame


def test_letterbox_keeps_aspect_and_centres():
    image = np.full((100, 200, 3), 7, np.uint8)
    out, info = letterbox(image, 160)
    assert out.shape == (160, 160, 3)
    assert info.ratio == pytest.approx(0.8) and (info.pad_x, info.pad_y) == (0.0, 40.0)
    assert (out[:40] == 114).all() and (out[120:] == 114).all() and (out[40:120] == 7).all()


def test_letterbox_roundtrip_of_boxes():
    rng = np.random.default_rng(0)
    for h, w in [(480, 640), (1080, 810), (77, 300), (160, 160)]:
        _, info = letterbox(np.zeros((h, w, 3), np.uint8), 320)
        corners = rng.uniform(0, 1, size=(5, 2, 2)) * np.array([w, h])
        boxes = np.concatenate([corners.min(1), corners.max(1)], 1)  # x1 y1 x2 y2 inside the frame
        in_input = boxes * info.ratio + np.array([info.pad_x, info.pad_y, info.pad_x, info.pad_y])
        back = scale_boxes_to_frame(in_input.astype(np.float32), info)
        assert np.allclose(back, boxes, atol=1e-3)


@pytest.mark.parametrize("in_size, out_size", [((37, 53), (80, 64)), ((270, 480), (45, 80)), ((64, 64), (64, 30))])
def test_resize_matches_torch_bilinear(in_size, out_size):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (*in_size, 3), dtype=np.uint8)
    ours = resize_bilinear(image, *out_size).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=out_size, mode="bilinear", align_corners=False
    )[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() <= 1.0  # rounding to uint8 only


def test_resize_of_a_gray_frame_is_the_resize_of_its_channel():
    gray = np.random.default_rng(2).integers(0, 256, (40, 30), dtype=np.uint8)
    ours = resize_bilinear(gray, 20, 45)
    assert ours.shape == (20, 45)
    np.testing.assert_array_equal(ours, resize_bilinear(np.repeat(gray[:, :, None], 3, 2), 20, 45)[:, :, 0])


def test_nms_matches_torchvision():
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 100, (200, 2))
    wh = rng.uniform(5, 40, (200, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 200).astype(np.float32)
    ours = nms(boxes, scores, 0.5)
    ref = tv_nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    assert np.array_equal(ours, ref)


def test_postprocess_is_class_aware_and_filters():
    # two overlapping boxes of different classes survive; a duplicate of the same class does not.
    pred = np.zeros((4 + 2, 4), np.float32)
    pred[:4, 0] = [50, 50, 20, 20]
    pred[:4, 1] = [51, 50, 20, 20]
    pred[:4, 2] = [50, 51, 20, 20]
    pred[:4, 3] = [10, 10, 4, 4]
    pred[4, 0], pred[4, 1], pred[5, 2], pred[4, 3] = 0.9, 0.8, 0.7, 0.1
    boxes, scores, classes = postprocess(pred, conf=0.25, iou=0.5)
    assert classes.tolist() == [0, 1] and scores.tolist() == pytest.approx([0.9, 0.7])
    assert np.allclose(boxes[0], [40, 40, 60, 60])
    assert box_iou(boxes[:1], boxes[1:]).item() > 0.5
    _, _, few = postprocess(pred, conf=0.0, iou=0.5, max_det=1)
    assert few.size == 1
