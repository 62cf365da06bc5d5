"""The model registry: exported ONNX models the service can serve, under ``<home>/models``.

Each model is a folder ``<home>/models/<id>/`` holding ``model.onnx`` and
``model.json`` (its metadata: classes, input size, where it came from, the
metrics of the job that trained it, export verification). Registration builds
the folder under a temporary name and renames it into place, so a listing never
sees half a model.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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

    def register(self, model_id: str, onnx_file: str | Path, move: bool = False, **meta: Any) -> ModelRecord:
        """Add ``onnx_file`` as ``model_id`` (copied, or moved with ``move=True``)."""
        folder = self._dir(model_id)
        if folder.exists():
            raise ConfigError(f"model {model_id!r} is already registered; pick another id or delete it first")
        onnx_file = Path(onnx_file)
        if not onnx_file.is_file():
            raise CheckpointError(f"no ONNX file at {onnx_file}; the export did not produce one")
        onnx_meta = read_onnx_metadata(onnx_file)
        staging = Path(tempfile.mkdtemp(prefix=f".{model_id}.", dir=self.root))
        try:
            target = staging / MODEL_FILE
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
            atomic_write_json(staging / META_FILE, data)
            staging.rename(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return record

    def delete(self, model_id: str) -> None:
        folder = self._dir(model_id)
        self.get(model_id)
        trash = self.root / f".deleted-{model_id}-{time.time_ns()}"
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
