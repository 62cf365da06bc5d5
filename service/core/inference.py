"""Loaded inference sessions and the in-flight limit.

:class:`DetectorPool` loads each registered model once (an
``export.runtime.Detector`` around one onnxruntime session) and reuses it for
every request; sessions are safe to call from several threads at once. Loading
happens in a worker thread behind a per-model lock, so a slow load only makes
requests for *that* model wait, never the others. Least recently used sessions
are dropped beyond ``max_loaded``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Protocol

import anyio

from models.errors import CheckpointError, GlassesVisionError
from service.core.errors import TooManyRequestsError
from service.registry import ModelRecord, ModelRegistry


log = logging.getLogger("glasses_vision.service")


class ModelLoadError(CheckpointError):
    """A registered model whose file the runtime cannot open."""

    http_status = 409


class DetectorLike(Protocol):
    def detect(self, image: Any, conf: float = ..., iou: float = ..., max_det: int = ...) -> list: ...


Loader = Callable[[Path], DetectorLike]


def runtime_loader(threads: int = 1) -> Loader:
    """A loader that builds ``export.runtime.Detector`` sessions with ``threads`` intra-op threads."""

    def load(path: Path) -> DetectorLike:
        from export.runtime import Detector

        params = inspect.signature(Detector).parameters
        kwargs: dict[str, Any] = {}
        if threads and "intra_op_threads" in params:
            kwargs["intra_op_threads"] = threads
        elif threads and "threads" in params:
            kwargs["threads"] = threads
        return Detector(path, **kwargs)

    return load


class LoadedModel:
    def __init__(self, record: ModelRecord, detector: DetectorLike):
        self.record, self.detector = record, detector


class DetectorPool:
    """Model id -> loaded detector, loaded on first use and kept."""

    def __init__(self, registry: ModelRegistry, loader: Loader, max_loaded: int = 4):
        self.registry, self.loader, self.max_loaded = registry, loader, max_loaded
        self._loaded: "OrderedDict[str, LoadedModel]" = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    def loaded_ids(self) -> list[str]:
        return list(self._loaded)

    def is_loaded(self, model_id: str) -> bool:
        return model_id in self._loaded

    async def get(self, model_id: str) -> LoadedModel:
        """The loaded model, loading it (off the event loop) if needed; unknown ids raise NotFoundError."""
        hit = self._loaded.get(model_id)
        if hit is not None:
            self._loaded.move_to_end(model_id)
            return hit
        lock = self._locks.setdefault(model_id, asyncio.Lock())
        async with lock:
            hit = self._loaded.get(model_id)
            if hit is not None:
                return hit
            record = await anyio.to_thread.run_sync(self.registry.get, model_id)
            try:
                detector = await anyio.to_thread.run_sync(self.loader, Path(record.path))
            except GlassesVisionError:
                raise
            except Exception as exc:  # onnxruntime's own errors: a file that is not a loadable model
                log.exception("loading model %s failed", model_id)
                raise ModelLoadError(
                    f"model {model_id!r} cannot be loaded ({type(exc).__name__}: {exc}); delete it and register it again"
                ) from None
            loaded = LoadedModel(record, detector)
            self._loaded[model_id] = loaded
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
            return loaded

    def evict(self, model_id: str) -> None:
        self._loaded.pop(model_id, None)


class InFlightLimiter:
    """Counts requests in flight; beyond ``limit`` new ones are refused with 429 at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self.in_flight >= self.limit:
                raise TooManyRequestsError(
                    f"{self.in_flight} detect requests are already in flight (limit {self.limit}); retry shortly "
                    "or raise GLASSES_VISION_MAX_CONCURRENT_INFERENCE"
                )
            self.in_flight += 1

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1
