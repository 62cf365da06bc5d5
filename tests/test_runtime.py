"""export.runtime: no torch needed, same boxes as the PyTorch eval path, clear errors on bad files and frames."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.runtime import Detection, Detector
from export.verify import asset_frames, generated_frames
from models.errors import CheckpointError, DataError
from models.processing import postprocess, preprocess
from tests.helpers.export import same_boxes
from tests.helpers.models import IMGSZ, NAMES

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_imports_and_runs_without_torch(exported, tmp_path):
    _, result = exported
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not installed on the glasses')\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path / 'fake')!r}, {str(ROOT)!r}]
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the fake torch did not shadow the real one")
        import numpy as np
        from export.runtime import Detector
        det = Detector({result.path!r})
        frame = np.full((240, 320, 3), 90, np.uint8)
        frame[40:200, 60:260] = (200, 30, 30)
        dets = det.detect(frame)
        assert all(0 <= d.box[0] <= d.box[2] <= 320 and 0 <= d.box[1] <= d.box[3] <= 240 for d in dets)
        bad = [m for m in ("torch", "ultralytics", "training") if m in sys.modules]
        assert not bad, bad
        print("ok", len(dets), det.names[0], det.imgsz)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ok, n, first, *_ = proc.stdout.split()
    assert ok == "ok" and int(n) > 0 and first == NAMES[0]


@pytest.mark.parametrize("frame", [*asset_frames(), *generated_frames()], ids=lambda f: getattr(f, "name", None) or "generated")
def test_runtime_matches_pytorch_eval_path(exported, frame):
    """bus.jpg (810x1080), zidane.jpg (1280x720) and generated frames: letterbox and the mapping back must agree."""
    model, result = exported
    det = Detector(result.path)
    image = det_image = frame
    if isinstance(frame, Path):
        from PIL import Image

        image = np.asarray(Image.open(frame).convert("RGB"))
    x, info = preprocess(image, IMGSZ)
    with torch.no_grad():
        ref = postprocess(model(torch.from_numpy(x)).numpy()[0], info, conf=0.25, iou=0.45, max_det=300)
    dets = det.detect(det_image, conf=0.25, iou=0.45)
    assert len(ref[0]) > 0 and all(isinstance(d, Detection) for d in dets)
    got = (np.array([d.box for d in dets]), np.array([d.score for d in dets]), np.array([d.class_id for d in dets]))
    assert same_boxes(ref, got)
    h, w = image.shape[:2]
    boxes = got[0]
    assert boxes[:, [0, 2]].max() <= w and boxes[:, [1, 3]].max() <= h and boxes.min() >= 0
    assert boxes[:, 2].max() > IMGSZ or boxes[:, 3].max() > IMGSZ  # in frame pixels, not network pixels
    assert {d.class_name for d in dets} <= set(NAMES)


def test_runtime_accepts_pil_gray_and_float(exported):
    from PIL import Image

    _, result = exported
    det = Detector(result.path, threads=1)
    frame = generated_frames()[0]
    ref = det.detect(frame)
    assert det.detect(Image.fromarray(frame)) == ref
    assert det.detect(frame.astype(np.float32) / 255.0) == ref
    assert isinstance(det.detect(frame[:, :, 0]), list)
    assert det.detect(frame, conf=0.25, max_det=3) == ref[:3]


def test_corrupt_and_foreign_files(exported, tmp_path):
    _, result = exported
    data = Path(result.path).read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="not a loadable ONNX model"):
        Detector(truncated)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot onnx at all" * 10)
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        Detector(garbage)
    with pytest.raises(CheckpointError, match="no ONNX file"):
        Detector(tmp_path / "missing.onnx")
    proto = onnx.load(result.path)
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(CheckpointError, match="no class names / input size"):
        Detector(bare)


def test_bad_frames(exported, tmp_path):
    _, result = exported
    det = Detector(result.path)
    with pytest.raises(DataError, match="HxWx3"):
        det.detect(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(DataError, match="does not exist"):
        det.detect(tmp_path / "nope.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(DataError, match="cannot decode"):
        det.detect(text)
    with pytest.raises(DataError, match="numpy array"):
        det.detect(123)
