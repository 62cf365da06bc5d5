"""``glasses-vision predict``: detect objects in images, folders, globs and videos; draw them, write them down.

    glasses-vision predict --model runs/kitchen/model.onnx --source frames/            # a folder of images
    glasses-vision predict --model runs/kitchen --source "walk/*.jpg" --conf 0.4        # a run dir, a glob
    glasses-vision predict --model glasses-base-yolo11n --source walk.mp4               # a video (mp4/avi/mov/mkv)
    glasses-vision predict --model kitchen.onnx --source new_domain/ --save-txt --no-save   # pseudo-labels only

--model is an .onnx file (run by the torch-free runtime, export/runtime.py), a model directory, a run
directory (its merged/ model) or a registered name (PyTorch). Both go through the same pre- and
post-processing (models.processing) and the same drawing function (export/draw.py).

Written under --out (default runs/predict):
  <name>.<ext>        each image with its boxes, class names and scores drawn on it
  <name>.mp4          each video, annotated, at the source's frame rate and size
  predictions.jsonl   one line per frame: {"file", "frame", "width", "height", "detections": [{"box" (x1, y1,
                      x2, y2 in frame pixels), "score", "class_id", "class_name"}]}
  labels/<name>.txt   with --save-txt: YOLO labels "class cx cy w h" (normalised; + score with --save-conf),
                      one file per frame (<name>_<frame>.txt for videos), empty for a frame without boxes
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v")


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="an .onnx file, a model directory, a run directory or a model name (glasses-base-yolo11n)")
    parser.add_argument("--source", required=True,
                        help="an image, a folder, a glob (quote it: \"frames/*.jpg\") or a video file")
    parser.add_argument("--out", default="runs/predict", help="output folder (default runs/predict)")
    parser.add_argument("--conf", type=float, default=0.25, help="confidence threshold (default 0.25)")
    parser.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
    parser.add_argument("--imgsz", type=int, default=None,
                        help="network input size (default: the model's; an .onnx file only runs at its own size)")
    parser.add_argument("--max-det", type=int, default=300, help="at most this many boxes per frame (default 300)")
    parser.add_argument("--save-txt", action="store_true", help="also write YOLO labels under <out>/labels/")
    parser.add_argument("--save-conf", action="store_true", help="with --save-txt: append each box's score")
    parser.add_argument("--no-save", dest="save", action="store_false",
                        help="do not write annotated images / videos (predictions.jsonl is always written)")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: the runtime's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


# ---------------------------------------------------------------------------------------------- the model
@dataclass
class Predictor:
    """A model behind the one detection path (``export.runtime.detect_frame``), ONNX or PyTorch."""

    network: Callable[[Any], Any]
    names: list[str]
    imgsz: tuple[int, int]
    description: str
    backend: str

    def __call__(self, frame, conf: float = 0.25, iou: float = 0.45, max_det: int = 300):
        from export.runtime import detect_frame

        return detect_frame(self.network, frame, self.imgsz, self.names, conf=conf, iou=iou, max_det=max_det)


def load_predictor(spec: str, imgsz: int | None = None, threads: int | None = None) -> Predictor:
    """An ``.onnx`` file (onnxruntime, no torch), or a model dir / run dir / registered name (PyTorch)."""
    from models.errors import CheckpointError, ConfigError

    path = Path(spec)
    if path.suffix.lower() == ".onnx":
        from export.runtime import Detector

        det = Detector(path, threads=threads)
        if imgsz is not None and (imgsz, imgsz) != tuple(det.imgsz):
            raise ConfigError(f"{path} takes {det.imgsz[0]}x{det.imgsz[1]} inputs, not {imgsz}; drop --imgsz or "
                              f"export it again with `glasses-vision export --imgsz {imgsz}`")
        return Predictor(det.raw, list(det.names), det.imgsz, str(path), "onnxruntime")
    if path.is_file():
        hint = (" it is an ultralytics checkpoint: import it first with `glasses-vision import --trust-pickle`,"
                if path.suffix.lower() == ".pt" else "")
        raise CheckpointError(f"{path} is a file but not an .onnx model;{hint} or pass a model or run directory")

    import torch

    from export.onnx_export import _check_imgsz
    from export.source import load_source
    from service.layers.peft import merged_copy

    if threads:
        torch.set_num_threads(int(threads))
    model, description, _ = load_source(spec)
    plain = merged_copy(model).float().cpu().eval()
    plain.fuse(verbose=False)
    size = _check_imgsz(imgsz if imgsz is not None else plain.imgsz, plain.max_stride)

    def network(x):
        with torch.inference_mode():
            return plain(torch.from_numpy(x)).numpy()

    return Predictor(network, [plain.names[i] for i in range(plain.nc)], size, description, "pytorch")


# ---------------------------------------------------------------------------------------------- the sources
def collect_sources(spec: str) -> list[Path]:
    """Image and video files named by a file, a folder (not recursive) or a glob, sorted."""
    from models.errors import DataError

    known = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() not in known:
            raise DataError(f"{path} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a video "
                            f"({', '.join(VIDEO_SUFFIXES)})")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in known)
        if not files:
            raise DataError(f"{path} holds no images or videos ({', '.join(known)})")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True)
                       if Path(p).is_file() and Path(p).suffix.lower() in known)
        if not files:
            raise DataError(f"no images or videos match {spec}")
        return files
    raise DataError(f"--source {spec} does not exist; pass an image, a folder, a glob or a video file")


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


@dataclass
class VideoInfo:
    fps: float
    frames: int
    width: int
    height: int


def open_video(path: Path):
    """``(cv2.VideoCapture, VideoInfo)``; a ``DataError`` if OpenCV cannot read the file."""
    import cv2

    from models.errors import DataError

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise DataError(f"cannot open {path} as a video (OpenCV could not decode it)")
    fps = cap.get(cv2.CAP_PROP_FPS)
    info = VideoInfo(fps=float(fps) if fps and fps > 0 else 30.0, frames=max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT))),
                     width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    return cap, info


def video_frames(cap) -> Iterator[Any]:
    """RGB frames of an open capture, in order."""
    while True:
        ok, frame = cap.read()
        if not ok:
            return
        yield frame[:, :, ::-1]


# ---------------------------------------------------------------------------------------------- the outputs
def yolo_label_lines(detections: Sequence[Any], width: int, height: int, save_conf: bool = False) -> list[str]:
    """YOLO label lines ``class cx cy w h`` normalised to the frame (``+ score`` with ``save_conf``)."""
    lines = []
    for d in detections:
        x1, y1, x2, y2 = d.box
        fields = [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]
        line = f"{d.class_id} " + " ".join(f"{v:.6f}" for v in fields)
        lines.append(line + (f" {d.score:.5f}" if save_conf else ""))
    return lines


@dataclass
class Outputs:
    """Everything ``predict`` writes under its output folder."""

    out: Path
    save: bool
    save_txt: bool
    save_conf: bool
    names_used: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.out.mkdir(parents=True, exist_ok=True)
        if self.save_txt:
            (self.out / "labels").mkdir(exist_ok=True)
        self.jsonl = open(self.out / "predictions.jsonl", "w", encoding="utf-8")

    def unique_stem(self, path: Path) -> str:
        """The source's stem, made unique among this run's sources (a.jpg and a.png -> a, a_2)."""
        stem, k = path.stem, 1
        while stem in self.names_used:
            k += 1
            stem = f"{path.stem}_{k}"
        self.names_used.add(stem)
        return stem

    def record(self, source: Path, frame_index: int, width: int, height: int, detections, label_name: str) -> None:
        line = {"file": str(source), "frame": frame_index, "width": width, "height": height,
                "detections": [{**d.to_dict(), "box": [round(v, 2) for v in d.box], "score": round(d.score, 5)}
                               for d in detections]}
        self.jsonl.write(json.dumps(line) + "\n")
        if self.save_txt:
            lines = yolo_label_lines(detections, width, height, self.save_conf)
            (self.out / "labels" / f"{label_name}.txt").write_text("".join(x + "\n" for x in lines))

    def close(self) -> None:
        self.jsonl.close()


@dataclass
class Summary:
    frames: int = 0
    boxes: int = 0
    sources: int = 0
    failed: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    seconds: float = 0.0


def predict(
    model: str | Predictor,
    source: str,
    out: str | Path = "runs/predict",
    conf: float = 0.25,
    iou: float = 0.45,
    imgsz: int | None = None,
    max_det: int = 300,
    save: bool = True,
    save_txt: bool = False,
    save_conf: bool = False,
    threads: int | None = None,
    quiet: bool = False,
) -> Summary:
    """Run ``model`` on every frame of ``source`` and write the outputs under ``out`` (see the module doc)."""
    from PIL import Image
    from tqdm import tqdm

    from export.draw import draw_array, draw_detections
    from export.runtime import load_image
    from models.errors import ConfigError, DataError

    if not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
        raise ConfigError(f"--conf and --iou must be between 0 and 1, got {conf} and {iou}")
    if max_det < 1:
        raise ConfigError(f"--max-det must be at least 1, got {max_det}")
    sources = collect_sources(source)
    if save and any(p.parent.resolve() == Path(out).resolve() for p in sources):
        raise ConfigError(f"--out {out} is the folder of the source frames: the annotated copies would overwrite "
                          "them; choose another --out (or --no-save)")
    predictor = model if isinstance(model, Predictor) else load_predictor(model, imgsz=imgsz, threads=threads)
    outputs = Outputs(Path(out), save, save_txt, save_conf)
    summary = Summary(sources=len(sources))
    videos = {}
    for path in sources:
        if is_video(path):
            try:
                videos[path] = open_video(path)
            except DataError as exc:
                summary.failed.append(str(exc))
    total = len([p for p in sources if not is_video(p)]) + sum(info.frames for _, info in videos.values())
    bar = tqdm(total=total or None, unit="frame", desc="predict", disable=quiet, dynamic_ncols=True)
    started = time.perf_counter()

    def detect(frame):
        dets = predictor(frame, conf=conf, iou=iou, max_det=max_det)
        summary.frames += 1
        summary.boxes += len(dets)
        bar.update(1)
        bar.set_postfix(boxes=summary.boxes, refresh=False)
        return dets

    try:
        for path in sources:
            if is_video(path) and path not in videos:
                continue  # could not be opened; reported at the end
            stem = outputs.unique_stem(path)
            if is_video(path):
                _predict_video(path, stem, videos[path], detect, outputs, summary, draw_array, bar)
                continue
            try:
                frame = load_image(path)
            except DataError as exc:
                summary.failed.append(str(exc))
                bar.update(1)
                continue
            dets = detect(frame)
            outputs.record(path, 0, frame.shape[1], frame.shape[0], dets, stem)
            if save:
                target = outputs.out / f"{stem}{path.suffix.lower()}"
                image: Image.Image = draw_detections(frame, dets)
                if target.suffix in (".jpg", ".jpeg"):
                    image.save(target, quality=95)
                else:
                    image.save(target)
                summary.written.append(str(target))
    finally:
        bar.close()
        outputs.close()
        for cap, _ in videos.values():
            cap.release()
    summary.seconds = time.perf_counter() - started
    if not summary.frames and summary.failed:
        raise DataError(f"no frame could be read: {summary.failed[0]}")
    return summary


def _predict_video(path, stem, opened, detect, outputs: Outputs, summary: Summary, draw_array, bar) -> None:
    import cv2

    from models.errors import DataError

    cap, info = opened
    writer, target = None, outputs.out / f"{stem}.mp4"
    if outputs.save:
        writer = cv2.VideoWriter(str(target), cv2.VideoWriter.fourcc(*"mp4v"), info.fps, (info.width, info.height))
        if not writer.isOpened():
            raise DataError(f"OpenCV cannot write {target} (mp4v codec, {info.width}x{info.height} at {info.fps} fps)")
    seen = 0
    try:
        for index, frame in enumerate(video_frames(cap)):
            seen += 1
            if info.frames and index >= info.frames:
                bar.total = (bar.total or 0) + 1  # the container under-reported its frame count
            dets = detect(frame)
            outputs.record(path, index, frame.shape[1], frame.shape[0], dets, f"{stem}_{index}")
            if writer is not None:
                writer.write(draw_array(frame, dets)[:, :, ::-1])
    finally:
        if writer is not None:
            writer.release()
    if not seen:
        summary.failed.append(f"{path}: no frame could be decoded")
        target.unlink(missing_ok=True)
        return
    if info.frames > seen:  # the container over-reported: keep the bar honest
        bar.total -= info.frames - seen
    if writer is not None:
        summary.written.append(str(target))


def run(args: argparse.Namespace) -> int:
    import sys

    summary = predict(args.model, args.source, out=args.out, conf=args.conf, iou=args.iou, imgsz=args.imgsz,
                      max_det=args.max_det, save=args.save, save_txt=args.save_txt, save_conf=args.save_conf,
                      threads=args.threads, quiet=args.quiet)
    for problem in summary.failed:
        print(f"warning: skipped {problem}", file=sys.stderr)
    rate = summary.frames / summary.seconds if summary.seconds > 0 else 0.0
    print(f"{summary.frames} frames from {summary.sources - len(summary.failed)} sources, {summary.boxes} boxes, "
          f"{rate:.1f} frames/s -> {Path(args.out) / 'predictions.jsonl'}"
          + (f", {len(summary.written)} annotated files" if summary.written else "")
          + (f", labels in {Path(args.out) / 'labels'}" if args.save_txt else ""))
    return 0
