"""The service's one ``Settings`` object.

Every field can be set by an environment variable ``GLASSES_VISION_<FIELD>``
(``GLASSES_VISION_HOME``, ``GLASSES_VISION_MAX_UPLOAD_BYTES``, ...); list fields
take comma-separated values (``GLASSES_VISION_API_KEYS=key1,key2``). Paths that
are left unset live under ``home``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.errors import ConfigError

ENV_PREFIX = "GLASSES_VISION_"
DEFAULT_MODEL_ID = "glasses-base-yolo11n"


def default_home() -> Path:
    """``$GLASSES_VISION_HOME`` or ``~/.glasses-vision``."""
    return Path(os.environ.get(f"{ENV_PREFIX}HOME") or Path.home() / ".glasses-vision")


class Settings(BaseModel):
    """Configuration of the HTTP service, its model registry and its job workers."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    home: Path = Field(default_factory=default_home, description="where models, jobs, logs and the job database live")
    host: str = Field("127.0.0.1", description="address uvicorn binds to")
    port: int = Field(8000, ge=0, le=65535)

    api_keys: list[str] = Field(
        default_factory=list,
        description="keys accepted in the X-API-Key header; empty: one is generated into <home>/api_key on first start",
    )
    inference_requires_key: bool = Field(False, description="also require X-API-Key on POST /v1/detect")

    data_root: Path | None = Field(None, description="dataset paths of jobs must lie under it (default <home>/data)")
    default_model: str = Field(DEFAULT_MODEL_ID, description="model id used when a request names none")
    default_model_source: Path | None = Field(
        None, description="model dir exported to ONNX as the default model on first start (default: the shipped base)"
    )
    load_default_model: bool = Field(True, description="export (if needed) and load the default model at startup")

    max_upload_bytes: int = Field(10 * 1024 * 1024, gt=0, description="largest image upload (bytes) -> 413 beyond")
    max_image_pixels: int = Field(
        12_200_000, gt=0,
        description="largest image (width*height, from its header) -> 413 beyond; 12.2 MP holds a 4032x3024 frame",
    )
    max_decode_bytes_in_flight: int = Field(
        128 * 1024 * 1024, gt=0,
        description="decoded image bytes held at once by all detect requests; beyond, requests wait for room",
    )
    request_body_timeout_s: float = Field(
        30.0, gt=0, le=600, description="a request whose body does not arrive within this many seconds -> 408"
    )
    max_dataset_zip_bytes: int = Field(200 * 1024 * 1024, gt=0, description="largest uploaded dataset zip")
    max_dataset_unzipped_bytes: int = Field(512 * 1024 * 1024, gt=0, description="largest total size inside a zip")
    max_dataset_zip_entries: int = Field(100_000, gt=0)
    max_active_dataset_bytes: int = Field(
        2 * 1024 * 1024 * 1024, gt=0,
        description="uploaded datasets that queued / running / interrupted jobs keep on disk, all together -> 507 beyond",
    )
    max_active_jobs_per_key: int = Field(4, gt=0, description="queued + running + interrupted jobs per API key -> 429")
    keep_failed_runs: int = Field(
        3, ge=0, description="run folders (checkpoints, for resume) kept for the newest failed jobs; older ones are removed"
    )

    inference_queue: int = Field(
        default_factory=lambda: 16 * max(2, os.cpu_count() or 1),
        ge=0, description="detect requests that may wait for a running slot (their uploads wait on disk); beyond -> 429",
    )
    inference_queue_timeout_s: float = Field(10.0, gt=0, description="longest wait for a slot -> 503 beyond")
    inference_threads: int = Field(1, ge=0, description="onnxruntime intra-op threads per session (0: its default)")
    detect_batch_size: int = Field(
        8, ge=1, le=64,
        description="most frames of concurrent detect requests for one model run as one ONNX batch (1: no batching; "
        "models exported with a fixed batch of 1 always run one frame at a time)",
    )
    detect_batch_parallel: int = Field(
        default_factory=lambda: max(1, os.cpu_count() or 1), ge=1, le=64,
        description="batches of one model run at once (one per core: a batch runs in one thread), each at most "
        "detect_batch_size frames; frames that arrive while all are busy wait for the next one free and run together",
    )
    detect_batch_wait_ms: float = Field(
        2.0, ge=0.0, le=50.0,
        description="how long a frame waits for others of the same model to join its batch; only while more detect "
        "requests for that model are arriving (a lone request never waits)",
    )
    detect_inline_when_idle: bool = Field(
        True,
        description="a detect request (upload up to 2 MiB) that finds nothing else in the server for its model (no "
        "frame queued or running, no other request on its way, at most one at once in the last second) runs on the "
        "event loop thread: no thread hand-off for a lone client; only with batching (detect_batch_size > 1)",
    )
    max_concurrent_inference: int = Field(
        # every frame the batches can hold: fewer slots cap the batches (2 slots on 2 cores kept each batch at
        # one or two frames: 0.63x in-process throughput at concurrency 4 against 0.76x, docs/benchmarks/service.md)
        default_factory=lambda data: data["detect_batch_size"] * data["detect_batch_parallel"],
        gt=0, description="detect requests running at once (default: detect_batch_size x detect_batch_parallel, "
        "all the frames the running batches can hold); decoding memory is bounded apart by max_decode_bytes_in_flight",
    )
    max_loaded_models: int = Field(4, gt=0, description="ONNX sessions kept loaded (least recently used dropped)")

    job_workers: int = Field(1, ge=0, description="worker processes running jobs (each one job at a time; 0: none)")
    worker_poll_seconds: float = Field(0.5, gt=0)
    worker_torch_threads: int = Field(1, ge=1, description="torch threads a worker trains with")
    worker_heartbeat_timeout_s: float = Field(
        30.0, gt=0, description="readiness fails when a live worker has not polled the job database for this long"
    )

    @field_validator("home", "data_root", "default_model_source", mode="after")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Workers run with another working directory: every path is made absolute once, here.
        return None if value is None else Path(os.path.abspath(Path(value).expanduser()))

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @property
    def resolved_data_root(self) -> Path:
        return (self.data_root or self.home / "data").expanduser().resolve()

    @property
    def db_path(self) -> Path:
        return self.home / "jobs.sqlite3"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def api_key_file(self) -> Path:
        return self.home / "api_key"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Settings from ``GLASSES_VISION_*`` variables; keyword ``overrides`` win (``None`` values are ignored)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid service settings ({problems}); fix the {ENV_PREFIX}* variables or flags") from None
