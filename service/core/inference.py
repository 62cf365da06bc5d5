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
import logging
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol

import anyio

from models.errors import CheckpointError, GlassesVisionError
from service.core.errors import NotReadyError, TooManyRequestsError
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

        return Detector(path, threads=threads or None)

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
    """At most ``limit`` detect requests run at once; up to ``queue`` more wait (at most ``timeout`` s) for a slot.

    Beyond the queue a request is refused at once (429); one that waits too long gets 503. Both carry
    ``Retry-After``.
    """

    def __init__(self, limit: int, queue: int = 0, timeout: float = 10.0):
        self.limit, self.queue, self.timeout = limit, queue, timeout
        self.in_flight = 0
        self.waiting = 0
        self._sem: anyio.Semaphore | None = None

    @asynccontextmanager
    async def slot(self, on_reject: Callable[[], None] | None = None) -> AsyncIterator[None]:
        """Hold a slot for the ``async with`` body; ``on_reject`` is called when refused (429 or 503)."""
        if self._sem is None:
            self._sem = anyio.Semaphore(self.limit)
        if self.in_flight >= self.limit and self.waiting >= self.queue:
            if on_reject:
                on_reject()
            raise TooManyRequestsError(
                f"{self.in_flight} detect requests are running and {self.waiting} waiting (limit {self.limit}, "
                f"queue {self.queue}); retry shortly or raise GLASSES_VISION_MAX_CONCURRENT_INFERENCE / "
                "GLASSES_VISION_INFERENCE_QUEUE"
            )
        self.waiting += 1
        try:
            with anyio.fail_after(self.timeout):
                await self._sem.acquire()
        except TimeoutError:
            if on_reject:
                on_reject()
            raise NotReadyError(
                f"no inference slot came free within {self.timeout:g} s (limit {self.limit}); retry shortly"
            ) from None
        finally:
            self.waiting -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._sem.release()
