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


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_dataset_path(data_root: str | Path, requested: str) -> Path:
    """The dataset file (``data.yaml`` or a COCO json) for ``requested``, confined to ``data_root``."""
    root = Path(data_root).expanduser().resolve()
    if not requested or not requested.strip():
        raise DataError("dataset is empty; give a path relative to the data root, e.g. 'kitchen/data.yaml'")
    raw = Path(requested)
    if ".." in raw.parts:
        raise DataError(f"dataset path {requested!r} contains '..'; give a path inside the data root {root}")
    candidate = raw if raw.is_absolute() else root / raw
    if raw.is_absolute() and not _inside(Path(os.path.abspath(candidate)), root):
        raise DataError(f"dataset path {requested!r} is outside the data root {root}; use a path relative to it")
    if not candidate.exists():
        raise DataError(f"dataset {requested!r} does not exist under the data root {root}")
    resolved = candidate.resolve()
    if not _inside(resolved, root):
        raise DataError(f"dataset path {requested!r} leads outside the data root {root} (a symlink?); refused")
    if resolved.is_dir():
        for name in ("data.yaml", "data.yml"):
            if (resolved / name).is_file():
                resolved = resolved / name
                break
        else:
            raise DataError(f"dataset folder {requested!r} has no data.yaml; add one (YOLO layout) or name the file")
    if resolved.suffix.lower() not in DATA_FILE_SUFFIXES:
        raise DataError(f"dataset {requested!r} must be a data.yaml (YOLO) or a COCO .json file")
    if resolved.suffix.lower() != ".json":
        check_data_yaml_confined(resolved, root)
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


def check_data_yaml_confined(yaml_path: Path, root: Path) -> None:
    """Refuse a ``data.yaml`` whose dataset folders resolve outside ``root``."""
    data = _load_yaml(yaml_path)
    base = _dataset_base(yaml_path, data)
    entries = [("path", base)]
    for key in _SPLIT_KEYS:
        value = data.get(key)
        for item in value if isinstance(value, list) else [value]:
            if item not in (None, ""):
                p = Path(str(item))
                entries.append((key, p if p.is_absolute() else base / p))
    for key, path in entries:
        if not _inside(path.resolve(), root):
            raise DataError(f"{yaml_path.name}: '{key}' points outside the allowed folder {root}; use relative paths")


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
        found = sorted(root.glob(pattern))
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
