"""The ultralytics YOLO dataset format: ``data.yaml`` plus ``images/`` and ``labels/*.txt``.

``data.yaml`` holds ``path`` (the dataset root), ``train`` / ``val`` / ``test``
(folders or ``.txt`` image lists, relative to ``path``; or COCO ``.json`` files)
and ``names`` (a list, or a dict ``{id: name}``). A label file sits where the
image is with the last ``images`` folder replaced by ``labels`` and the suffix by
``.txt``; each line is ``class cx cy w h`` normalised to [0, 1]. An image without
a label file, or with an empty one, has no objects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from models.errors import DataError
from models.io import atomic_write_text
from training.data.dataset import DataProblem, DetectionDataset, Record, check_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


def _names(raw: Any, source: Path) -> list[str]:
    if isinstance(raw, dict):
        try:
            ids = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise DataError(f"{source}: 'names' keys must be class ids 0..nc-1, got {list(raw)[:5]}") from None
        if ids != list(range(len(ids))):
            raise DataError(f"{source}: 'names' ids must be 0..{len(ids) - 1} without gaps, got {ids}")
        return [str(raw[k] if k in raw else raw[str(k)]) for k in ids]
    if isinstance(raw, (list, tuple)):
        return [str(n) for n in raw]
    raise DataError(f"{source}: 'names' must be a list of class names or a dict {{id: name}}")


def read_data_yaml(path: str | Path) -> dict[str, Any]:
    """Read a ``data.yaml``; returns ``root``, ``names``, ``nc``, ``yaml_file`` and each present split as a list of absolute paths."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist; give the path of a data.yaml")
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path} must be a mapping with 'train', 'val' and 'names'")
    if "names" not in cfg:
        raise DataError(f"{path} has no 'names'; add the list of class names")
    names = _names(cfg["names"], path)
    if "nc" in cfg and int(cfg["nc"]) != len(names):
        raise DataError(f"{path}: nc={cfg['nc']} but {len(names)} names are listed; make them agree")
    root = Path(cfg.get("path") or path.parent)
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    if not root.exists() and Path(cfg.get("path", "")).is_absolute():
        root = path.parent.resolve()  # the dataset was moved: its own folder is the root
    out: dict[str, Any] = {"root": root, "names": names, "nc": len(names), "yaml_file": path.resolve()}
    for split in SPLITS:
        entry = cfg.get(split)
        if entry is None:
            continue
        entries = entry if isinstance(entry, (list, tuple)) else [entry]
        out[split] = [p if p.is_absolute() else root / p for p in (Path(str(e)) for e in entries)]
    if "train" not in out and "val" not in out:
        raise DataError(f"{path} names no 'train' or 'val' split; add e.g. 'train: images/train'")
    return out


def write_data_yaml(file: str | Path, *, root: str | Path | None, train: str, val: str, names: list[str],
                    test: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a ``data.yaml`` atomically; ``root`` becomes its ``path`` entry (absolute, as ultralytics expects)."""
    cfg: dict[str, Any] = {}
    if root is not None:
        cfg["path"] = str(root)
    cfg.update({"train": train, "val": val})
    if test:
        cfg["test"] = test
    cfg["nc"] = len(names)
    cfg["names"] = {i: n for i, n in enumerate(names)}
    if extra:
        cfg.update(extra)
    return atomic_write_text(file, yaml.safe_dump(cfg, sort_keys=False))


def list_images(sources: list[Path]) -> list[Path]:
    """Image files of a split: folders are searched recursively, ``.txt`` files list one image per line."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files += sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif src.is_file() and src.suffix == ".txt":
            for line in src.read_text().splitlines():
                line = line.strip()
                if line:
                    p = Path(line)
                    files.append(p if p.is_absolute() else (src.parent / p))
        elif not src.exists():
            raise DataError(f"split source {src} does not exist; fix 'train'/'val' in the data.yaml")
        else:
            raise DataError(f"split source {src} is neither a folder of images nor a .txt image list")
    return files


def label_path(image: Path) -> Path:
    """Where the label file of ``image`` is: the last ``images`` folder becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def parse_label_file(path: Path, nc: int) -> tuple[np.ndarray, np.ndarray, list[DataProblem]]:
    """Classes ``(n,)`` and normalised ``cx cy w h`` boxes ``(n, 4)`` of a label file, with every problem found."""
    problems: list[DataProblem] = []
    cls, boxes = [], []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float32), [DataProblem(str(path), 0, f"cannot read label file: {exc}")]
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            problems.append(DataProblem(str(path), lineno, f"expected 5 fields 'class cx cy w h', got {len(fields)}"))
            continue
        try:
            values = [float(f) for f in fields]
        except ValueError:
            problems.append(DataProblem(str(path), lineno, f"fields must be numbers, got {line.strip()!r}"))
            continue
        c = values[0]
        if c != int(c) or c < 0 or c >= nc:
            problems.append(DataProblem(str(path), lineno, f"class id {fields[0]} is not an integer in 0..{nc - 1} (nc={nc})"))
            continue
        xywh = values[1:]
        if any(not 0.0 <= v <= 1.0 for v in xywh):
            problems.append(DataProblem(str(path), lineno, f"coordinates {' '.join(fields[1:])} must be normalised to [0, 1]"))
            continue
        if xywh[2] <= 0 or xywh[3] <= 0:
            problems.append(DataProblem(str(path), lineno, "box has zero width or height"))
            continue
        cls.append(int(c))
        boxes.append(xywh)
    return np.asarray(cls, np.int64), np.asarray(boxes, np.float32).reshape(-1, 4), problems


def write_label_file(path: str | Path, classes: np.ndarray, boxes_cxcywh: np.ndarray) -> None:
    """Write ``class cx cy w h`` lines (normalised boxes)."""
    lines = [f"{int(c)} {b[0]:.6f} {b[1]:.6f} {b[2]:.6f} {b[3]:.6f}" for c, b in zip(classes, boxes_cxcywh)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def relpath(p: Path, start: Path) -> str:
    return os.path.relpath(p, start)


class YoloDataset(DetectionDataset):
    """A YOLO split (folders or ``.txt`` lists of images) checked file by file; see :class:`DetectionDataset`."""

    def __init__(self, sources: list[Path], names: list[str], imgsz: int = 320, augment=False, *, strict: bool = True,
                 check_images: bool = True, source: str = ""):
        records, problems = [], []
        nc = len(names)
        if nc == 0:
            raise DataError(f"dataset {source} lists no class names")
        for im_file in list_images([Path(s) for s in sources]):
            found: list[DataProblem] = []
            if not im_file.is_file():
                found.append(DataProblem(str(im_file), 0, "image file is missing"))
            elif check_images and (bad := check_image(im_file)) is not None:
                found.append(bad)
            lbl = label_path(im_file)
            cls, boxes = np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
            if lbl.is_file():
                cls, boxes, label_problems = parse_label_file(lbl, nc)
                found += label_problems
            if found:
                if strict:
                    raise DataError(f"{found[0]} (pass strict=False / use 'glasses-vision data check' to skip and list bad files)")
                problems += found
                continue
            records.append(Record(im_file, cls, boxes, normalized=True))
        super().__init__(records, names, imgsz, augment, problems, source or ",".join(map(str, sources)))
