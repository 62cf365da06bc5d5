"""DetectionAugment: PIL or tensor in, the same uint8 tensor out, boxes moved with the pixels, one torch thread inside;
its OpenCV colour jitter matches torchvision's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from training.data.augment import AugmentConfig, ColorJitter, DetectionAugment, single_thread

BOXES = torch.tensor([[8.0, 10.0, 30.0, 40.0], [40.0, 20.0, 60.0, 50.0]])
CLASSES = torch.tensor([1, 3])


@pytest.fixture
def frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def smooth_frame() -> np.ndarray:
    """Colour gradients (hue, saturation and brightness all vary), like a photo rather than noise."""
    y, x = np.mgrid[0:64, 0:64].astype(np.float32) / 63
    return (np.stack([x, y, 1 - (x + y) / 2], -1) * 230 + 10).astype(np.uint8)


@pytest.mark.parametrize("settings, worst", [({"brightness": 0.3}, 1), ({"contrast": 0.3}, 1), ({"saturation": 0.5}, 1),
                                             ({"hue": 0.015}, 10), ({"brightness": 0.3, "contrast": 0.3,
                                                                    "saturation": 0.5, "hue": 0.015}, 14)])
def test_color_jitter_matches_torchvision_in_float_and_draws_the_same_numbers(settings, worst):
    """Against torchvision's exact float path with the same draws: rounding only for brightness, contrast and
    saturation; hue goes through 8-bit HSV (as torchvision's own PIL path does: its mean error here is 0.4-1.5
    levels, its largest 4-10), whose error a later saturation boost can enlarge, hence ``worst``."""
    frame = smooth_frame()
    as_float = torch.from_numpy(frame).permute(2, 0, 1).float() / 255
    for seed in range(5):
        torch.manual_seed(seed)
        ours = np.asarray(ColorJitter(**settings)(Image.fromarray(frame))).astype(float)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        exact = (v2.ColorJitter(**settings)(as_float) * 255).permute(1, 2, 0).numpy()
        assert torch.equal(after_ours, torch.rand(1))  # the same random draws: runs stay reproducible
        difference = np.abs(ours - exact)
        assert difference.max() <= worst and difference.mean() < 1.5, (seed, difference.max(), difference.mean())


def test_color_jitter_leaves_tensors_to_torchvision():
    image = torch.from_numpy(smooth_frame()).permute(2, 0, 1).contiguous()
    torch.manual_seed(0)
    ours = ColorJitter(brightness=0.3, hue=0.015)(image)
    torch.manual_seed(0)
    assert torch.equal(ours, v2.ColorJitter(brightness=0.3, hue=0.015)(image))


def test_pil_and_tensor_inputs_give_the_same_sample(frame):
    aug = DetectionAugment()
    torch.manual_seed(3)
    a = aug(Image.fromarray(frame), BOXES, CLASSES)
    torch.manual_seed(3)
    b = aug(torch.from_numpy(frame).permute(2, 0, 1).contiguous(), BOXES, CLASSES)
    assert a[0].dtype == torch.uint8 and a[0].shape == (3, 64, 64)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_identity_settings_return_the_frame_and_boxes_unchanged(frame):
    cfg = AugmentConfig(fliplr=0, brightness=0, contrast=0, saturation=0, hue=0, scale=(1.0, 1.0), translate=0.0)
    img, boxes, cls = DetectionAugment(cfg)(Image.fromarray(frame), BOXES, CLASSES)
    assert torch.equal(img, torch.from_numpy(frame).permute(2, 0, 1))
    torch.testing.assert_close(boxes, BOXES)
    assert torch.equal(cls, CLASSES)


def test_zoom_moves_boxes_with_the_pixels():
    """A white square on grey, zoomed 1.25x about the centre: its box lands where its pixels are."""
    frame = np.full((64, 64, 3), 114, np.uint8)
    frame[24:40, 16:32] = 255
    aug = DetectionAugment(AugmentConfig(fliplr=0, brightness=0, contrast=0, saturation=0, hue=0,
                                         scale=(1.25, 1.25), translate=0.0))
    img, boxes, _ = aug(Image.fromarray(frame), torch.tensor([[16.0, 24.0, 32.0, 40.0]]), torch.tensor([0]))
    torch.testing.assert_close(boxes, torch.tensor([[12.0, 22.0, 32.0, 42.0]]))
    ys, xs = np.nonzero(img[0].numpy() == 255)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (12, 32, 22, 42)


def test_transforms_run_with_one_thread_and_the_count_is_restored(frame):
    seen = []

    class Probe(v2.Transform):
        def forward(self, *inputs):
            seen.append(torch.get_num_threads())
            return inputs if len(inputs) > 1 else inputs[0]

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        aug = DetectionAugment()
        aug.transform = v2.Compose([Probe(), aug.transform])
        aug(Image.fromarray(frame), BOXES, CLASSES)
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), single_thread():
            raise RuntimeError("a failing transform")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
