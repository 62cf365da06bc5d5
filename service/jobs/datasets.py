"""Dataset locations a job may use: confined paths and safely extracted zips.

A job names its dataset either by a path under the configured data root or by an
uploaded zip in YOLO layout (``data.yaml`` + images + labels). Paths with ``..``,
absolute paths outside the root and symlinks that lead out of it are refused,
and so is a ``data.yaml`` whose ``path`` / ``train`` / ``val`` / ``test`` entries
point outside. A zip is checked entry by entry (no absolute names, no ``..``, no
symlinks, entry count and total size within limits) before anything is written,
and sizes are enforced again while extracting, so a lying header cannot fill
the disk.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import yaml

from models.errors import DataError
from models.io import atomic_write_text
from service.core.errors import PayloadTooLargeError, UnsupportedMediaError

DATA_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_SPLIT_KEYS = ("train", "val", "test")
# What training/data reads (training.data.yolo: IMAGE_SUFFIXES, list_images, label_path; coco: image roots).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: a dataset with more files than this is refused at submission (its check would take too long).
MAX_DATASET_FILES = 200_000


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _lexical(path: Path) -> Path:
    """Absolute and normalised without touching the disk (``..`` folded, symlinks not followed)."""
    return Path(os.path.normpath(os.path.abspath(path)))


class _Confined:
    """Checks that every path a job reads resolves inside ``root``; messages never show a path outside it."""

    def __init__(self, root: Path, max_files: int = MAX_DATASET_FILES):
        self.root, self.max_files, self.files = root, max_files, 0

    def show(self, path: Path) -> str:
        lexical = _lexical(path)
        return str(lexical.relative_to(self.root)) if _inside(lexical, self.root) else "(outside the data root)"

    def path(self, path: Path, what: str) -> Path:
        """``path`` resolved (symlinks followed), refused unless it stays inside the root."""
        lexical = _lexical(path)
        if not _inside(lexical, self.root):
            raise DataError(f"{what} points outside the data root; every file a job reads must lie inside it")
        try:
            resolved = lexical.resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long, a NUL in the name
            raise DataError(f"{what} ({self.show(lexical)}) cannot be resolved (a symlink loop?); fix it") from None
        if not _inside(resolved, self.root):
            raise DataError(f"{what} ({self.show(lexical)}) is a symlink that leads outside the data root; refused")
        return resolved

    def count(self, n: int = 1) -> None:
        self.files += n
        if self.files > self.max_files:
            raise DataError(f"the dataset has more than {self.max_files} files; split it or use fewer frames")

    def image(self, image: Path, what: str) -> None:
        """An image and the label file training reads for it (``images`` -> ``labels``, ``.txt``)."""
        self.count()
        self.path(image, what)
        parts = list(image.parts)
        for i in range(len(parts) - 2, -1, -1):
            if parts[i] == "images":
                parts[i] = "labels"
                break
        self.path(Path(*parts).with_suffix(".txt"), f"the label file of {what}")

    def tree(self, folder: Path, what: str) -> None:
        """Every image below ``folder``, and every symlink there (files or folders) must stay inside."""
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            here = Path(dirpath)
            # images are counted by image(), once each
            self.count(len(dirnames) + sum(1 for name in filenames if Path(name).suffix.lower() not in IMAGE_SUFFIXES))
            for name in dirnames:
                if (here / name).is_symlink():
                    self.path(here / name, f"{what}: folder {self.show(here / name)}")
            for name in filenames:
                p = here / name
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    self.image(p, f"{what}: image {self.show(p)}")
                elif p.is_symlink():
                    self.path(p, f"{what}: file {self.show(p)}")

    def image_list(self, txt: Path, what: str) -> None:
        """A ``.txt`` list of images: every line must name an image inside the root."""
        try:
            text = txt.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{what} ({self.show(txt)}) cannot be read ({type(exc).__name__}); fix it") from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line:
                p = Path(line)
                self.image(p if p.is_absolute() else txt.parent / p, f"{what}, line {number} of {self.show(txt)}")


def resolve_dataset_path(data_root: str | Path, requested: str, what: str = "dataset") -> Path:
    """The dataset file (``data.yaml`` or a COCO json) for ``requested``, confined to ``data_root``.

    Every file the job will read - split folders, ``.txt`` image lists and each line of them, images, their
    label files, COCO image files, symlinks anywhere in between - must resolve inside the root; the
    ``DataError`` never shows a path outside it, nor whether such a path exists.
    """
    root = Path(data_root).expanduser().resolve()
    if not isinstance(requested, str) or not requested.strip():
        raise DataError(f"{what} is empty; give a path relative to the data root, e.g. 'kitchen/data.yaml'")
    raw = Path(requested)
    if ".." in raw.parts:
        raise DataError(f"{what} path {requested!r} contains '..'; give a path inside the data root")
    if raw.is_absolute() and not _inside(_lexical(raw), root):
        raise DataError(f"{what} path is outside the data root; use a path relative to it")
    guard = _Confined(root)
    try:
        resolved = guard.path(raw if raw.is_absolute() else root / raw, what)
        if not resolved.exists():
            raise DataError(f"{what} {requested!r} does not exist under the data root")
        if resolved.is_dir():
            for name in ("data.yaml", "data.yml"):
                if (resolved / name).is_file():
                    resolved = guard.path(resolved / name, what)
                    break
            else:
                raise DataError(f"{what} folder {requested!r} has no data.yaml; add one (YOLO layout) or name the file")
        if resolved.suffix.lower() not in DATA_FILE_SUFFIXES:
            raise DataError(f"{what} {requested!r} must be a data.yaml (YOLO) or a COCO .json file")
        if resolved.suffix.lower() == ".json":
            _check_coco_confined(resolved, guard, what)
        else:
            check_data_yaml_confined(resolved, root, guard=guard, what=what)
    except OSError as exc:  # a name too long, a permission problem: say which, without a path outside
        raise DataError(f"{what} {requested[:100]!r} cannot be read ({exc.strerror or type(exc).__name__})") from None
    return resolved


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"{path.name} is not valid YAML ({exc.__class__.__name__}); fix the file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path.name} must be a YAML mapping with 'train', 'val' and 'names'")
    return data


def _dataset_base(yaml_path: Path, data: dict) -> Path:
    base = data.get("path")
    if base in (None, ""):
        return yaml_path.parent
    base = Path(str(base))
    return base if base.is_absolute() else yaml_path.parent / base


def check_data_yaml_confined(yaml_path: Path, root: Path, guard: "_Confined | None" = None, what: str = "dataset") -> None:
    """Refuse a ``data.yaml`` that makes training read any file outside ``root`` (see :func:`resolve_dataset_path`)."""
    guard = guard or _Confined(Path(root).resolve())
    data = _load_yaml(yaml_path)
    base = _dataset_base(yaml_path, data)
    guard.path(base, f"{what}: {yaml_path.name} 'path'")
    for key in _SPLIT_KEYS:
        value = data.get(key)
        for item in value if isinstance(value, list) else [value]:
            if item in (None, ""):
                continue
            p = Path(str(item))
            source = p if p.is_absolute() else base / p
            label = f"{what}: {yaml_path.name} '{key}'"
            resolved = guard.path(source, label)
            if resolved.is_dir():
                guard.tree(source, label)
            elif resolved.is_file() and resolved.suffix == ".txt":
                guard.image_list(source, label)
            elif resolved.is_file() and resolved.suffix.lower() in IMAGE_SUFFIXES:
                guard.image(source, label)


def _check_coco_confined(json_path: Path, guard: _Confined, what: str) -> None:
    """A COCO json: every ``file_name`` (looked up in its folder, then its ``images/``) must stay inside."""
    import json

    try:
        doc = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what}: {json_path.name} is not valid JSON ({type(exc).__name__}); fix it") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{what}: {json_path.name} is not a COCO detection file (no 'images' list)")
    for entry in images:
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(f"{what}: {json_path.name} has an image without a 'file_name'")
        guard.count()
        for folder in (json_path.parent, json_path.parent / "images"):
            guard.path(folder / name, f"{what}: {json_path.name} image {name[:100]!r}")


def _entry_is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _safe_member_name(info: zipfile.ZipInfo) -> PurePosixPath:
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if name.startswith("/") or (path.parts and path.parts[0].endswith(":")) or ".." in path.parts:
        raise DataError(f"zip entry {info.filename!r} points outside the archive (absolute path or '..'); refused")
    if _entry_is_symlink(info):
        raise DataError(f"zip entry {info.filename!r} is a symlink; zips with links are refused")
    return path


def extract_dataset_zip(
    zip_path: str | Path,
    dest: str | Path,
    max_total_bytes: int,
    max_entries: int,
) -> Path:
    """Check then extract a YOLO-layout zip into ``dest``; returns its ``data.yaml``.

    The ``data.yaml``'s ``path`` is rewritten to the extracted folder, and its
    splits must stay inside it.
    """
    dest = Path(dest)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError):
        raise UnsupportedMediaError("the dataset upload is not a zip file; upload a .zip in YOLO layout") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > max_entries:
            raise PayloadTooLargeError(f"the zip has {len(infos)} entries, more than the limit {max_entries}")
        declared = sum(i.file_size for i in infos)
        if declared > max_total_bytes:
            raise PayloadTooLargeError(
                f"the zip unpacks to {declared} bytes, more than the limit {max_total_bytes}; upload a smaller dataset"
            )
        members = [(info, _safe_member_name(info)) for info in infos]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            written = 0
            for info, rel in members:
                target = tmp.joinpath(*rel.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as out:
                    remaining = info.file_size
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        remaining -= len(chunk)
                        if remaining < 0 or written > max_total_bytes:
                            raise PayloadTooLargeError(
                                f"zip entry {info.filename!r} unpacks to more than it declares or the total exceeds "
                                f"{max_total_bytes} bytes; refused"
                            )
                        out.write(chunk)
            yaml_path = _find_data_yaml(tmp)
            os.replace(tmp, dest)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"the zip is corrupt ({exc}); create it again and re-upload") from None
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(
                f"zip entry {info.filename!r} clashes with another entry (a file and a folder of the same name); "
                "rename one and re-upload"
            ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    extracted_yaml = dest / yaml_path.relative_to(tmp)
    try:
        _rebase_data_yaml(extracted_yaml, dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return extracted_yaml


def _find_data_yaml(root: Path) -> Path:
    for pattern in ("data.yaml", "data.yml", "*/data.yaml", "*/data.yml"):
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if found:
            return found[0]
    raise DataError("the zip has no data.yaml at its top level (or one folder down); add a YOLO data.yaml")


def _rebase_data_yaml(yaml_path: Path, root: Path) -> None:
    data = _load_yaml(yaml_path)
    base = data.get("path")
    if base in (None, "") or Path(str(base)).is_absolute():
        data["path"] = str(yaml_path.parent.resolve())
    else:
        data["path"] = str((yaml_path.parent / str(base)).resolve())
    atomic_write_text(yaml_path, yaml.safe_dump(data, sort_keys=False))
    check_data_yaml_confined(yaml_path, root.resolve())
