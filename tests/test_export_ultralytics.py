"""``glasses-vision export --format ultralytics``: a .pt that ultralytics.YOLO loads, predicts, vals and tracks with.

Network is blocked in these tests (DNS and connect raise): ultralytics must not download anything.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import numpy as np
import pytest

from export.runtime import Detector
from models.errors import ConfigError, ExportError
from service.cli import main
from tests.helpers.export import same_boxes
from tests.helpers.models import IMGSZ, NAMES


@pytest.fixture()
def no_network(monkeypatch):
    """Every DNS lookup and outgoing connection fails at once; returns the list of attempts with their call stacks."""
    attempts: list[tuple[str, str]] = []

    def blocked_dns(host, *args, **kwargs):
        attempts.append((str(host), "".join(traceback.format_stack())))
        raise socket.gaierror("network blocked by the test")

    def blocked_connect(self, address, *args, **kwargs):
        if self.family == getattr(socket, "AF_UNIX", None):
            return real_connect(self, address, *args, **kwargs)
        attempts.append((str(address), "".join(traceback.format_stack())))
        raise OSError("network blocked by the test")

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket, "getaddrinfo", blocked_dns)
    monkeypatch.setattr(socket.socket, "connect", blocked_connect)
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    return attempts


def _frame_files(folder: Path, sizes, seed: int = 3) -> list[Path]:
    from PIL import Image

    from training.data.synthetic import render_frame

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"frame{i}_{w}x{h}.png"
        Image.fromarray(render_frame(w, h, seed=seed, index=i)).save(path)
        files.append(path)
    return files


def _triple(result):
    boxes = result.boxes
    return boxes.xyxy.numpy(), boxes.conf.numpy(), boxes.cls.numpy().astype(int)


def _ours(det: Detector, path: Path, **kw):
    dets = det.detect(path, **kw)
    return (np.array([d.box for d in dets], np.float32).reshape(-1, 4), np.array([d.score for d in dets]),
            np.array([d.class_id for d in dets]))


def test_yolo_loads_and_predicts_the_same_boxes_as_our_runtime(exported, tmp_path, no_network, capsys):
    from ultralytics import YOLO

    model, onnx_result = exported
    model_dir = model.save(tmp_path / "model")
    out = tmp_path / "tuned.pt"
    assert main(["export", "--format", "ultralytics", "--from", str(model_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pickle" in text and "max |diff|" in text and out.is_file()

    yolo = YOLO(str(out))
    assert yolo.task == "detect" and yolo.names == dict(enumerate(NAMES)) and yolo.overrides["imgsz"] == IMGSZ
    det = Detector(onnx_result.path)
    frames = _frame_files(tmp_path / "frames", [(128, 128), (192, 144), (160, 200), (640, 480), (333, 251)])
    compared = 0
    for path in frames:
        ours = _ours(det, path, conf=0.25, iou=0.45)
        # rect=False: ultralytics letterboxes to the full square, as the exported file (and the glasses) do
        theirs = _triple(yolo.predict(str(path), iou=0.45, rect=False, save=False, verbose=False)[0])
        assert len(ours[0]) > 0 and same_boxes(ours, theirs, match_iou=0.99), path.name
        compared += len(ours[0])
    assert compared >= 20
    # a square frame: ultralytics' own defaults (rect=True) change nothing, only NMS IoU differs (0.7 vs 0.45)
    square = _triple(yolo.predict(str(frames[0]), iou=0.45, save=False, verbose=False)[0])
    assert same_boxes(_ours(det, frames[0]), square, match_iou=0.99)
    assert no_network == []  # loading and predicting downloaded nothing (no font, no asset)


def test_yolo_val_and_track_with_the_exported_base_model(tmp_path, no_network):
    from ultralytics import YOLO

    from export.ultralytics_export import export_ultralytics
    from models.registry import load_base_model
    from training.data.synthetic import generate_dataset, render_frame
    from training.evaluate import evaluate

    result = export_ultralytics("glasses-base-yolo11n", tmp_path / "base.pt")
    assert result.precision == "fp32" and result.max_abs_diff is not None and result.frames_checked == 2
    data = generate_dataset(tmp_path / "data", domain="source", n=16, imgsz=IMGSZ, seed=5)
    yolo = YOLO(str(tmp_path / "base.pt"))
    metrics = yolo.val(data=str(data), imgsz=IMGSZ, batch=8, plots=False, verbose=False, workers=0,
                       project=str(tmp_path / "ul"), name="val")
    ours = evaluate(load_base_model(), data, split="val", imgsz=IMGSZ, quiet=True)
    assert metrics.box.map50 > 0.5 and abs(metrics.box.map50 - ours["map50"]) < 0.1  # the weights carried over
    # val's dataset check looks for its plotting font (Arial.ttf) even with plots=False: one HEAD request,
    # refused here at once, and val goes on. Nothing else reaches for the network.
    assert all("check_font" in stack for _, stack in no_network), [host for host, _ in no_network]
    no_network.clear()

    import cv2

    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (160, 128))
    frame = render_frame(160, 128, seed=1, domain="source", index=0)
    for _ in range(6):  # the same scene: each object keeps its track id
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    tracks = yolo.track(str(video), tracker="bytetrack.yaml", iou=0.45, rect=False, save=False, verbose=False,
                        project=str(tmp_path / "ul"), name="track")
    assert len(tracks) == 6
    ids = [sorted(r.boxes.id.int().tolist()) for r in tracks if r.boxes.id is not None]
    assert len(ids) >= 5 and ids[0] and all(i == ids[0] for i in ids)
    assert no_network == []


def test_the_file_needs_only_ultralytics_and_holds_its_model_class(exported, tmp_path):
    """The pickled model is ultralytics' own class, so loading it imports nothing of this project."""
    from export.ultralytics_export import export_ultralytics

    model, _ = exported
    out = tmp_path / "tuned.pt"
    export_ultralytics(model, out, half=True)
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["YOLO_OFFLINE"] = "1"
        sys.path = [p for p in sys.path if p not in ("", {str(Path.cwd())!r}, {str(Path(__file__).resolve().parents[1])!r})]
        import torch
        ckpt = torch.load({str(out)!r}, map_location="cpu", weights_only=False)
        m = ckpt["model"]
        assert type(m).__module__ == "ultralytics.nn.tasks", type(m)
        assert next(m.parameters()).dtype == torch.float16
        from ultralytics import YOLO
        YOLO({str(out)!r})
        ours = [k for k in sys.modules if k.split(".")[0] in ("models", "export", "service", "training")]
        assert not ours, ours
        print("ok", ckpt["train_args"]["imgsz"], len(ckpt["model"].names))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", str(IMGSZ), str(len(NAMES))]


def test_adapters_are_merged_and_errors_are_clear(exported, tmp_path, monkeypatch, capsys):
    import torch

    import export.ultralytics_export as ue
    from service.layers.peft import merged_copy

    model, _ = exported
    try:
        from service.layers.peft import apply_lora
    except Exception as exc:  # pragma: no cover - the PEFT layers are another part of the project
        pytest.skip(f"PEFT layers not importable: {exc}")
    from export.verify import generated_frames
    from models.processing import preprocess
    from models.registry import load_base_model

    base, tuned = load_base_model(), load_base_model()  # trained weights: an adapter visibly moves the output
    apply_lora(tuned, rank=4, targets=["neck"], max_share=None)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:  # as after training: both factors non-zero
                p.normal_(0, 0.05)
    result = ue.export_ultralytics(tuned.eval(), tmp_path / "lora.pt")
    assert result.merged_adapters and result.max_abs_diff < 0.05
    loaded = torch.load(tmp_path / "lora.pt", map_location="cpu", weights_only=False)["model"]
    x = torch.from_numpy(preprocess(generated_frames()[0], IMGSZ)[0])
    with torch.no_grad():
        want, before = tuned(x), base(x)
        got = loaded.eval()(x)[0]
    assert (got - want).abs().max() < 0.05 and (want - before).abs().max() > 1.0  # the adapter is in the file

    with pytest.raises(ConfigError, match=r"\.pt"):
        ue.export_ultralytics(model, tmp_path / "x.onnx")
    monkeypatch.setattr(ue, "TOLERANCE", {"fp32": -1.0, "fp16": -1.0})
    with pytest.raises(ExportError, match="was not written"):
        ue.export_ultralytics(model, tmp_path / "never.pt")
    assert not (tmp_path / "never.pt").exists()
    assert main(["export", "--format", "ultralytics", "--from", "yolo11n", "--out", str(tmp_path / "y.pt"), "--int8"]) == 2
    assert "only apply to --format onnx" in capsys.readouterr().err
