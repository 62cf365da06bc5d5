"""The model registry: exported ONNX models the service can serve, under ``<home>/models``.

Each model is a folder ``<home>/models/<id>/`` holding ``model.onnx`` and
``model.json`` (its metadata: classes, input size, where it came from, the
metrics of the job that trained it, export verification). Registration builds
the folder under a hidden name and renames it into place, so a listing never
sees half a model. The two steps can be taken apart: ``prepare`` does the slow
work (the file moved or copied, hashed, described) into a hidden folder and
``publish`` only renames it into place (``discard`` removes it instead).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List

from models.errors import CheckpointError, ConfigError, NotFoundError
from models.io import atomic_write_json, file_sha256

MODEL_FILE = "model.onnx"
META_FILE = "model.json"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class ModelRecord:
    """What the registry knows about one model."""

    id: str
    path: str
    size_bytes: int
    sha256: str
    created_at: float
    source: str = ""
    job_id: str | None = None
    base_model: str | None = None
    classes: list[str] | None = None
    imgsz: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] | None = None
    export: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    onnx_metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreparedModel:
    """A registration made by ``ModelRegistry.prepare``: the finished model folder, still under a hidden name."""

    record: ModelRecord
    folder: Path
    published: bool = False


def check_model_id(model_id: str) -> str:
    """Model ids are folder names: letters, digits, ``.``, ``_``, ``-``; at most 64 characters."""
    if not isinstance(model_id, str) or not _ID_RE.match(model_id) or model_id in (".", ".."):
        raise ConfigError(
            f"invalid model id {model_id!r}; use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return model_id


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (empty if it has none or cannot be read as ONNX)."""
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises its own DecodeError types
        raise CheckpointError(f"{path} is not a readable ONNX model ({type(exc).__name__}); export it again") from None
    return {p.key: p.value for p in proto.metadata_props}


class ModelRegistry:
    """List, look up, register and delete served models."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, model_id: str) -> Path:
        return self.root / check_model_id(model_id)

    def exists(self, model_id: str) -> bool:
        try:
            return (self._dir(model_id) / META_FILE).is_file()
        except ConfigError:
            return False

    def ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / META_FILE).is_file())

    def list(self) -> list[ModelRecord]:
        out = []
        for model_id in self.ids():
            try:
                out.append(self.get(model_id))
            except (NotFoundError, CheckpointError):  # deleted meanwhile, or unreadable (GET /v1/models/{id} says why)
                continue
        return out

    def get(self, model_id: str) -> ModelRecord:
        try:
            folder = self._dir(model_id)
        except ConfigError:
            folder = None
        if folder is None or not (folder / META_FILE).is_file():
            known = ", ".join(self.ids()) or "none"
            raise NotFoundError(f"unknown model {model_id!r}; registered models: {known}")
        try:
            data = json.loads((folder / META_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"the registry entry of {model_id!r} is unreadable ({exc}); delete it and register again") from None
        data["path"] = str(folder / MODEL_FILE)
        return ModelRecord(**{k: v for k, v in data.items() if k in ModelRecord.__dataclass_fields__})

    def onnx_path(self, model_id: str) -> Path:
        return Path(self.get(model_id).path)

    def staging_folders(self) -> List[Path]:  # ``list`` is this class's method
        """The hidden folders under the registry: prepared registrations not yet published nor discarded, and
        deletions under way (or left by a process that was killed meanwhile)."""
        return sorted(p for p in self.root.iterdir() if p.name.startswith(".") and p.is_dir())

    def prepare(self, model_id: str, onnx_file: str | Path, move: bool = False, staging: str | None = None,
                **meta: Any) -> PreparedModel:
        """Do the work of a registration (``onnx_file`` copied, or moved with ``move=True``; hashed; described) into
        a hidden folder of the registry, ``staging`` (a name starting with ``.``; one left there before is replaced)
        or a new one. Nothing is listed until ``publish``; ``discard`` removes it."""
        folder = self._dir(model_id)
        if folder.exists():
            raise ConfigError(f"model {model_id!r} is already registered; pick another id or delete it first")
        onnx_file = Path(onnx_file)
        if not onnx_file.is_file():
            raise CheckpointError(f"no ONNX file at {onnx_file}; the export did not produce one")
        onnx_meta = read_onnx_metadata(onnx_file)
        if staging is None:
            # never ".job-...": a model id may start with "job-", and the retention sweep owns those names
            hidden = Path(tempfile.mkdtemp(prefix=f".new-{model_id}.", dir=self.root))
        else:
            if not staging.startswith(".") or "/" in staging or staging in (".", ".."):
                raise ValueError(f"a staging folder is a hidden name in the registry, not {staging!r}")
            hidden = self.root / staging
            shutil.rmtree(hidden, ignore_errors=True)
            hidden.mkdir()
        try:
            target = hidden / MODEL_FILE
            (shutil.move if move else shutil.copyfile)(str(onnx_file), str(target))
            record = ModelRecord(
                id=model_id,
                path=str(folder / MODEL_FILE),
                size_bytes=target.stat().st_size,
                sha256=file_sha256(target),
                created_at=time.time(),
                onnx_metadata=onnx_meta,
                **meta,
            )
            data = record.to_dict()
            data.pop("path")
            atomic_write_json(hidden / META_FILE, data)
        except BaseException:
            shutil.rmtree(hidden, ignore_errors=True)
            raise
        return PreparedModel(record, hidden)

    def publish(self, prepared: PreparedModel) -> ModelRecord:
        """Rename a prepared model into place (atomic: nothing is read or written but the folder's name)."""
        folder = self._dir(prepared.record.id)
        if folder.exists():
            raise ConfigError(
                f"model {prepared.record.id!r} is already registered; pick another id or delete it first")
        prepared.folder.rename(folder)
        prepared.published = True
        return prepared.record

    def discard(self, prepared: PreparedModel) -> None:
        """Remove a prepared model; one already published is first taken back out of the listing (its
        registration is undone, e.g. when what it was published with failed to be recorded)."""
        if prepared.published:
            self._dir(prepared.record.id).rename(prepared.folder)
            prepared.published = False
        shutil.rmtree(prepared.folder, ignore_errors=True)

    def register(self, model_id: str, onnx_file: str | Path, move: bool = False, **meta: Any) -> ModelRecord:
        """Add ``onnx_file`` as ``model_id`` (copied, or moved with ``move=True``): ``prepare`` and ``publish``."""
        prepared = self.prepare(model_id, onnx_file, move=move, **meta)
        try:
            return self.publish(prepared)
        except BaseException:
            self.discard(prepared)
            raise

    def delete(self, model_id: str) -> None:
        folder = self._dir(model_id)
        self.get(model_id)
        trash = self.root / f".deleted-{model_id}-{time.time_ns()}"
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
