"""export.draw: one drawing function, readable on any background, torch-free, every detection format."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from export.draw import EDGE, class_color, draw_array, draw_detections, text_color
from export.runtime import Detection

ROOT = Path(__file__).resolve().parents[1]


def _contrast(a, b) -> float:
    def lum(c):
        c = np.asarray(c, np.float64)[..., :3] / 255.0
        c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return c @ np.array([0.2126, 0.7152, 0.0722])

    la, lb = lum(a), lum(b)
    return (np.maximum(la, lb) + 0.05) / (np.minimum(la, lb) + 0.05)


def test_label_text_contrast_meets_wcag_for_every_class_colour():
    for cid in range(100):
        color = class_color(cid)
        assert _contrast(text_color(color), color) >= 4.5, (cid, color)
    assert len({class_color(i) for i in range(20)}) == 20  # distinct colours for the first classes


@pytest.mark.parametrize("background", [0, 255, 128, "class", "noise"])
def test_boxes_stand_out_on_any_background(background):
    """Across the box line there is a pixel with contrast >= 3:1 against the background; on noise, the line is unbroken."""
    rng = np.random.default_rng(0)
    frame = np.zeros((120, 160, 3), np.uint8)
    if background == "noise":
        frame[:] = rng.integers(0, 256, frame.shape, dtype=np.uint8)
    elif background == "class":
        frame[:] = class_color(3)
    else:
        frame[:] = background
    before = frame.copy()
    out = draw_array(frame, [Detection((30.0, 40.0, 130.0, 110.0), 0.9, 3, "book")], line_width=3)
    assert np.array_equal(frame, before)  # the input is not modified
    assert out.shape == frame.shape and out.dtype == np.uint8
    left_edge = out[45:100, 26:36]  # the box's left side, below the label
    is_color = (left_edge == np.array(class_color(3))).all(axis=2)
    is_edge = (left_edge == np.array(EDGE)).all(axis=2)
    assert is_color.sum(axis=1).min() >= 3 and is_edge.sum(axis=1).min() >= 2  # every row: the line and its edges
    if background != "noise":
        assert max(_contrast(class_color(3), before[0, 0]), _contrast(EDGE, before[0, 0])) >= 3.0


def test_accepts_detections_dicts_and_arrays_alike():
    frame = np.full((100, 200, 3), 90, np.uint8)
    box = (20.0, 30.0, 120.0, 90.0)
    from_obj = draw_array(frame, [Detection(box, 0.75, 1, "bottle")])
    from_dict = draw_array(frame, [{"box": list(box), "score": 0.75, "class_id": 1, "class_name": "bottle"}])
    from_arrays = draw_array(frame, (np.array([box]), np.array([0.75]), np.array([1])), names=["cup", "bottle"])
    assert np.array_equal(from_obj, from_dict) and np.array_equal(from_obj, from_arrays)
    no_score = draw_array(frame, [Detection(box, 0.75, 1, "bottle")], show_score=False)
    assert not np.array_equal(from_obj, no_score)  # the score is part of the label
    other_name = draw_array(frame, [Detection(box, 0.75, 1, "flask")])
    assert not np.array_equal(from_obj, other_name)  # so is the class name


def test_label_sits_above_the_box_else_inside_and_stays_in_the_frame():
    frame = np.full((100, 200, 3), 255, np.uint8)
    color = np.array(class_color(0))
    above = draw_array(frame, [Detection((40.0, 50.0, 150.0, 95.0), 0.5, 0, "cup")])
    rows = np.where((above == color).all(axis=2).any(axis=1))[0]
    assert rows.min() < 50 - 5  # the label patch is above the box
    top = draw_array(frame, [Detection((150.0, 0.0, 200.0, 60.0), 0.5, 0, "a_long_class_name")])
    cols = np.where((top == color).all(axis=2).any(axis=0))[0]
    assert cols.max() < 200 and cols.min() < 150  # shifted left to stay inside the frame
    rows = np.where((top[:, 160:190] == color).all(axis=2).any(axis=1))[0]
    assert rows.min() >= 0 and rows.max() > 5  # inside the box, under its top edge


def test_no_detections_and_pil_input():
    from PIL import Image

    frame = np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    assert np.array_equal(draw_array(frame, []), frame)
    image = Image.fromarray(frame).convert("L")
    out = draw_detections(image, [Detection((5.0, 5.0, 40.0, 40.0), 0.3, 2, "phone")])
    assert out.mode == "RGB" and out.size == (60, 50) and image.mode == "L"
    with pytest.raises(ValueError, match="needs a box"):
        draw_detections(frame, [{"score": 0.3}])
    with pytest.raises(ValueError, match="HxWx3"):
        draw_detections(np.zeros((2, 3, 4, 5), np.uint8), [])


def test_draw_imports_without_torch(tmp_path):
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not installed on the glasses')\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path / 'fake')!r}, {str(ROOT)!r}]
        import numpy as np
        from export.draw import draw_array
        out = draw_array(np.zeros((64, 64, 3), np.uint8), [{{"box": [4, 4, 40, 40], "score": 0.5, "class_name": "cup"}}])
        assert out.any()
        bad = [m for m in ("torch", "ultralytics", "cv2", "training", "models") if m in sys.modules]
        assert not bad, bad
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
