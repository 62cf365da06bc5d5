"""``glasses-vision predict`` on generated frames, a folder, a glob and a video the test writes itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.runtime import Detector
from service.commands.predict import collect_sources, predict, yolo_label_lines
from tests.helpers.export import same_boxes
from tests.helpers.models import IMGSZ, NAMES

ROOT = Path(__file__).resolve().parents[1]


def _frames(n: int, width: int = 192, height: int = 144, seed: int = 0) -> list[np.ndarray]:
    from training.data.synthetic import render_frame

    return [render_frame(width, height, seed=seed, domain="egocentric", index=i) for i in range(n)]


@pytest.fixture()
def frame_dir(tmp_path):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(_frames(3)):
        Image.fromarray(frame).save(folder / f"f{i}.png")
    Image.fromarray(_frames(1, 160, 200, seed=4)[0]).save(folder / "portrait.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image")
    return folder


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _as_triple(dets: list[dict]):
    return (np.array([d["box"] for d in dets], np.float32).reshape(-1, 4), np.array([d["score"] for d in dets]),
            np.array([d["class_id"] for d in dets]))


def test_predict_folder_onnx_writes_images_jsonl_and_labels(exported, frame_dir, tmp_path):
    from PIL import Image

    _, result = exported
    out = tmp_path / "out"
    summary = predict(result.path, str(frame_dir), out=out, save_txt=True, save_conf=True, quiet=True)
    lines = _lines(out)
    assert [Path(x["file"]).name for x in lines] == ["f0.png", "f1.png", "f2.png", "portrait.jpg"]
    assert summary.frames == 4 and summary.boxes == sum(len(x["detections"]) for x in lines) > 0
    det = Detector(result.path)
    for line in lines:
        source = Path(line["file"])
        want = det.detect(source)
        got = line["detections"]
        assert [d["class_name"] for d in got] == [d.class_name for d in want]
        assert np.allclose([d["box"] for d in got], [d.box for d in want], atol=0.01) if got else not want
        with Image.open(source) as im:
            assert (line["width"], line["height"], line["frame"]) == (im.width, im.height, 0)
        drawn = out / source.name
        with Image.open(drawn) as im:
            assert im.size == (line["width"], line["height"])
            if got:  # the boxes are drawn on the copy, the source is unchanged
                assert not np.array_equal(np.asarray(im.convert("RGB")), np.asarray(Image.open(source).convert("RGB")))
        labels = (out / "labels" / f"{source.stem}.txt").read_text().splitlines()
        assert len(labels) == len(got)
        for row, d in zip(labels, got):
            cid, cx, cy, w, h, score = row.split()
            assert int(cid) == d["class_id"] and abs(float(score) - d["score"]) < 1e-4
            x1 = (float(cx) - float(w) / 2) * line["width"]
            y2 = (float(cy) + float(h) / 2) * line["height"]
            assert abs(x1 - d["box"][0]) < 0.01 and abs(y2 - d["box"][3]) < 0.01
    assert not (out / "notes.txt").exists()


def test_predict_video_keeps_frame_rate_size_and_frame_order(exported, tmp_path):
    import cv2

    _, result = exported
    video = tmp_path / "walk.mp4"
    frames = _frames(6, 160, 120, seed=2)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 7.0, (160, 120))
    assert writer.isOpened()
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()

    out = tmp_path / "out"
    summary = predict(result.path, str(video), out=out, save_txt=True, quiet=True)
    assert summary.frames == 6
    lines = _lines(out)
    assert [x["frame"] for x in lines] == list(range(6)) and all(x["file"] == str(video) for x in lines)
    assert sorted(p.name for p in (out / "labels").iterdir()) == sorted(f"walk_{i}.txt" for i in range(6))

    # the same boxes as the runtime on the frames OpenCV decodes from the input
    det, cap = Detector(result.path), cv2.VideoCapture(str(video))
    decoded = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        decoded.append(bgr[:, :, ::-1])
    cap.release()
    assert len(decoded) == 6
    for frame, line in zip(decoded, lines):
        want = [d.to_dict() for d in det.detect(frame)]
        assert same_boxes(_as_triple(want), _as_triple(line["detections"]))

    cap = cv2.VideoCapture(str(out / "walk.mp4"))
    assert cap.isOpened()
    assert abs(cap.get(cv2.CAP_PROP_FPS) - 7.0) < 0.01
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (160, 120)
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    assert count == 6


def test_predict_model_dir_runs_pytorch_with_the_same_outputs(exported, frame_dir, tmp_path):
    model, result = exported
    model_dir = model.save(tmp_path / "model")
    glob_source = str(frame_dir / "f*.png")
    a = predict(result.path, glob_source, out=tmp_path / "onnx", save=False, quiet=True)
    b = predict(str(model_dir), glob_source, out=tmp_path / "torch", save=False, quiet=True)
    assert a.frames == b.frames == 3
    assert not list((tmp_path / "torch").glob("*.png"))  # --no-save
    for x, y in zip(_lines(tmp_path / "onnx"), _lines(tmp_path / "torch")):
        assert x["file"] == y["file"]
        assert same_boxes(_as_triple(x["detections"]), _as_triple(y["detections"]))


def test_predict_skips_unreadable_frames_and_checks_settings(exported, frame_dir, tmp_path):
    from models.errors import CheckpointError, ConfigError, DataError

    _, result = exported
    (frame_dir / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    summary = predict(result.path, str(frame_dir), out=tmp_path / "out", quiet=True)
    assert summary.frames == 4 and len(summary.failed) == 1 and "broken.jpg" in summary.failed[0]
    with pytest.raises(ConfigError, match="takes 128x128"):
        predict(result.path, str(frame_dir), out=tmp_path / "o2", imgsz=IMGSZ * 2, quiet=True)
    with pytest.raises(ConfigError, match="overwrite"):
        predict(result.path, str(frame_dir), out=frame_dir, quiet=True)
    with pytest.raises(DataError, match="does not exist"):
        predict(result.path, str(tmp_path / "missing"), out=tmp_path / "o3", quiet=True)
    with pytest.raises(DataError, match="no images or videos match"):
        collect_sources(str(tmp_path / "*.gif"))
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="glasses-vision import"):
        predict(str(tmp_path / "w.pt"), str(frame_dir), out=tmp_path / "o4", quiet=True)
    with pytest.raises(ConfigError, match="--conf"):
        predict(result.path, str(frame_dir), out=tmp_path / "o5", conf=1.5, quiet=True)


def test_yolo_label_lines_round_trip():
    from export.runtime import Detection

    lines = yolo_label_lines([Detection((10.0, 20.0, 50.0, 100.0), 0.5, 2, "phone")], width=200, height=100)
    assert lines == ["2 0.150000 0.600000 0.200000 0.800000"]


def test_predict_cli_subprocess(exported, frame_dir, tmp_path):
    _, result = exported
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "service.cli", "predict", "--model", result.path, "--source", str(frame_dir / "*.png"),
           "--out", str(out), "--save-txt", "--conf", "0.3", "--max-det", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "3 frames" in proc.stdout and "frames/s" in proc.stdout
    assert "frame/s" in proc.stderr  # the progress bar (tqdm) with its rate
    lines = _lines(out)
    assert len(lines) == 3 and all(len(x["detections"]) <= 5 for x in lines)
    assert all(d["score"] > 0.3 and d["class_name"] in NAMES for x in lines for d in x["detections"])
    assert len(list((out / "labels").glob("*.txt"))) == 3 and len(list(out.glob("*.png"))) == 3

    quiet = subprocess.run(cmd + ["--quiet", "--out", str(tmp_path / "q")], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
    assert quiet.returncode == 0 and "frame/s" not in quiet.stderr

    helped = subprocess.run([sys.executable, "-m", "service.cli", "predict", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert helped.returncode == 0 and "--save-txt" in helped.stdout and "predictions.jsonl" in helped.stdout

    bad = subprocess.run([sys.executable, "-m", "service.cli", "predict", "--model", result.path,
                          "--source", str(tmp_path / "nothing.jpg")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_predict_on_onnx_needs_no_torch(exported, frame_dir, tmp_path):
    """On the glasses: ``glasses-vision predict --model x.onnx`` with torch absent (a fake torch that fails to import)."""
    import os

    _, result = exported
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not installed on the glasses')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(ROOT)])}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "service.cli", "predict", "--model", result.path, "--source",
                           str(frame_dir), "--out", str(out), "--quiet", "--save-txt"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(_lines(out)) == 4 and (out / "f0.png").is_file() and (out / "labels" / "f0.txt").is_file()
