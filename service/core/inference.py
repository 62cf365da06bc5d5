"""Loaded inference sessions and the in-flight limit.

:class:`DetectorPool` loads each registered model once (an
``export.runtime.Detector`` around one onnxruntime session) and reuses it for
every request; sessions are safe to call from several threads at once. Loading
happens in a worker thread behind a per-model lock, so a slow load only makes
requests for *that* model wait, never the others. Least recently used sessions
are dropped beyond ``max_loaded``.

:class:`MicroBatcher` runs the frames of detect requests for one model that
arrive together as one ONNX batch (decode, letterbox, one ``session.run``, NMS per
frame, all in one worker thread), in up to ``detect_batch_parallel`` lanes at once.
Frames that arrive while every lane is busy run together in the next free lane; a
frame that finds a lane free waits for company at most ``detect_batch_wait_ms``, and
only when company is expected (requests on their way, or more frames than lanes in
the air a moment ago): a lone request on a quiet server never waits. Results are
those of a single-frame ``Detector.detect`` call (the same pre/post-processing, row
by row).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, OrderedDict
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Protocol

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


def batchable(detector: DetectorLike) -> bool:
    """An ``export.runtime.Detector`` whose file takes any batch size (``batch_size`` None); other loaders'
    detectors run one frame per call."""
    from export.runtime import Detector

    return isinstance(detector, Detector) and detector.batch_size is None


@dataclass
class FrameJob:
    """One request's frame: ``decode`` (bytes -> ``service.core.images.Decoded``, under the limits) and its thresholds."""

    decode: Callable[[], Any]
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300
    nbytes: int = 0  # the upload's size: only small frames may run on the event loop (see MicroBatcher.inline)


@dataclass
class FrameResult:
    """The decoded frame, its detections (``export.runtime.Detection``) and its share of the runtime's seconds."""

    image: Any
    detections: list
    seconds: float
    batch: int = 1


@dataclass(eq=False)
class _Slot:
    job: FrameJob
    future: "asyncio.Future[FrameResult]"


def run_frames(detector: Any, jobs: list[FrameJob], model_id: str = "?") -> list[FrameResult | BaseException]:
    """Decode, letterbox, run as one batch and post-process ``jobs`` (in the calling thread); one entry per job.

    A frame that cannot be decoded gets its own exception; the others still run. Each frame goes through the
    same ``preprocess`` / ``postprocess`` as ``export.runtime.Detector.detect``, so its boxes are the ones a
    single-frame call gives.
    """
    import numpy as np

    from export.runtime import Detection, load_image
    from models.processing import postprocess, preprocess

    out: list[FrameResult | BaseException | None] = [None] * len(jobs)
    ready = []  # (index, decoded, input, letterbox info, preprocess seconds)
    for i, job in enumerate(jobs):
        try:
            image = job.decode()
            start = time.perf_counter()
            x, info = preprocess(load_image(image.rgb), detector.imgsz)
            ready.append((i, image, x, info, time.perf_counter() - start))
        except Exception as exc:  # this frame's own problem (corrupt, too large, budget): only it fails
            out[i] = exc
    if ready:
        start = time.perf_counter()
        try:
            pred = detector.raw(np.concatenate([r[2] for r in ready]) if len(ready) > 1 else ready[0][2])
        except GlassesVisionError as exc:
            pred, error = None, exc
        except Exception as exc:  # onnxruntime failing on this model: say which model, keep serving
            log.exception("inference with %s failed", model_id)
            pred, error = None, ModelLoadError(
                f"model {model_id!r} failed on this image ({type(exc).__name__}: {exc}); "
                "check the model with GET /v1/models/{id} or re-export it")
        if pred is not None and (rows := pred.shape[0]) != len(ready):  # a file whose output ignores its batch axis
            pred, error = None, ModelLoadError(
                f"model {model_id!r} answered {rows} rows for a batch of {len(ready)} frames; its output "
                "does not follow its dynamic batch axis - re-export it, or set GLASSES_VISION_DETECT_BATCH_SIZE=1")
        share = (time.perf_counter() - start) / len(ready)
        names = detector.names
        for row, (i, image, _x, info, pre_s) in enumerate(ready):
            if pred is None:
                out[i] = error
                continue
            job = jobs[i]
            t0 = time.perf_counter()
            boxes, scores, classes = postprocess(np.asarray(pred[row], dtype=np.float32), info,
                                                 conf=job.conf, iou=job.iou, max_det=job.max_det)
            found = [Detection(box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])), score=float(s),
                               class_id=int(c), class_name=names[int(c)] if int(c) < len(names) else str(int(c)))
                     for b, s, c in zip(boxes, scores, classes)]
            out[i] = FrameResult(image, found, pre_s + share + time.perf_counter() - t0, len(ready))
    return out  # type: ignore[return-value]


class MicroBatcher:
    """Frames of concurrent detect requests for one model, run together as one ONNX batch.

    Batches run in up to ``parallel`` lanes at once (one per core: a batch runs in one worker thread). A frame
    that arrives while every lane is busy waits for the next free lane and runs there with the frames that
    arrived meanwhile: the lane takes its equal share of them over all lanes (up to ``max_batch``), leaving the
    rest to the lanes still busy, so that none of them idles while its clients' next frames are on their way.
    The lane's thread takes them itself as it finishes its batch: a busy event loop (parsing and answering
    other requests) does not hold the next batch back. Under load, batches form without any timer. A
    frame that finds a lane free runs at once unless company is expected, in which case it waits up to
    ``wait_s`` for it. Company is expected while requests for the model are on their way (``coming()``, see
    :meth:`DetectorPool.arriving`), and while fewer frames are in the batcher (queued, running or on their way)
    than the most seen at once in the last second if that was more than the lanes: closed-loop clients (each
    answer brings the next frame) keep that many in the air, and a frame that waits for the next one runs in a
    batch of two instead of alone (with no more frames than lanes, each runs at once in its own). Frames that
    start together are split into equal shares over the lanes (on a 2-core machine 4 frames run as 2 batches
    of 2, which keeps most of the per-frame gain of batching and both cores busy).

    With ``inline``, a small frame (``FrameJob.nbytes`` up to ``INLINE_MAX_BYTES``) that finds the batcher idle,
    no other request for the model on its way and at most one frame at once in the last second runs on the
    event loop thread: a lone client's request skips the two thread wake-ups of a lane. The check is made after
    yielding to the loop once, so requests read in the same turn of the loop are seen; closed-loop clients at
    concurrency 2 and more keep the peak above one and never run inline.
    """

    PEAK_WINDOW_S = 0.5  # the peak of frames at once is kept for one to two of these
    INLINE_MAX_BYTES = 2 * 1024 * 1024  # larger uploads may take long to decode: never on the event loop

    def __init__(self, detector: Any, model_id: str, max_batch: int, wait_s: float,
                 coming: Callable[[], int] = lambda: 0, parallel: int = 1, inline: bool = False):
        self.detector, self.model_id = detector, model_id
        self.max_batch, self.wait_s, self.coming = max(1, int(max_batch)), max(0.0, float(wait_s)), coming
        self.parallel, self.inline = max(1, int(parallel)), bool(inline)
        self._lock = threading.Lock()  # _pending and the counters below: shared with the lanes' threads
        self._pending: list[_Slot] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self.running = 0  # lanes busy now
        self._running_frames = 0
        self._peaks = [0, 0]  # most frames in the batcher at once: in this window, in the one before
        self._window_end = 0.0
        self.batches = 0  # batches run so far (for tests and logs)
        self.frames = 0
        self.inline_frames = 0  # of which run on the event loop

    async def detect(self, job: FrameJob, arrival: "Arrival | None" = None) -> FrameResult:
        """The frame's result once its batch has run; raises the frame's own error.

        ``arrival`` (the request's count as on its way) ends as the frame joins the queue, in one step.
        """
        if self.inline and job.nbytes <= self.INLINE_MAX_BYTES and self._alone(arrival):
            await asyncio.sleep(0)  # let requests read in this turn of the loop reach the batcher (or count as coming)
            if self._alone(arrival):
                if arrival is not None:
                    arrival.leave(poke=False)
                return self._run_inline(job)
        slot = _Slot(job, asyncio.get_running_loop().create_future())
        with self._lock:
            self._pending.append(slot)
        if arrival is not None:
            arrival.leave(poke=False)
        self.poke()
        try:
            return await asyncio.shield(slot.future)
        except asyncio.CancelledError:
            with self._lock:
                queued = slot in self._pending
                if queued:  # cancelled before its batch started: it never runs
                    self._pending.remove(slot)
            if queued:
                raise
            # its batch is running: keep the request (and its slot, which bounds decodes) until the frame is done,
            # as a cancelled thread call would
            with anyio.CancelScope(shield=True):
                await asyncio.wait([slot.future])
            raise

    def _alone(self, arrival: "Arrival | None") -> bool:
        """Nothing queued or running, no other request on its way, and no more than one frame at once lately."""
        if self._pending or self.running:
            return False
        others = self.coming() - (0 if arrival is None or arrival.left else 1)
        return others <= 0 and self._recent_peak(1) <= 1

    def _run_inline(self, job: FrameJob) -> FrameResult:
        with self._lock:
            self.running += 1
            self._running_frames += 1
        try:
            result = run_frames(self.detector, [job], self.model_id)[0]
        finally:
            with self._lock:
                self.running -= 1
                self._running_frames -= 1
                self.batches += 1
                self.frames += 1
                self.inline_frames += 1
        if isinstance(result, BaseException):
            raise result
        return result

    def poke(self) -> None:
        """Start batches now if a lane is free and (the free lanes' batches are full or no company is expected);
        else start the wait timer. With no lane free, the next lane to come free takes what is pending."""
        coming = self.coming()
        with self._lock:
            if not self._pending:
                return
            pending, running = len(self._pending), self.running
            here = pending + self._running_frames + max(coming, 0)
        peak = self._recent_peak(here)
        free = self.parallel - running
        if free <= 0:
            return
        company = coming > 0 or (here < peak and peak > self.parallel)  # more frames than lanes: worth pairing
        if pending >= self.max_batch * free or self.wait_s <= 0 or not company:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.wait_s, self._flush)

    def _recent_peak(self, here: int) -> int:
        """The most frames in the batcher at once over the last one or two windows, ``here`` included."""
        now = time.monotonic()
        if now >= self._window_end:
            late = now >= self._window_end + self.PEAK_WINDOW_S  # a whole window without a frame: forget it
            self._peaks = [0, 0 if late else self._peaks[0]]
            self._window_end = now + self.PEAK_WINDOW_S
        self._peaks[0] = max(self._peaks[0], here)
        return max(self._peaks)

    def _share(self, queued: int) -> int:
        """Frames a lane takes from ``queued`` waiting ones: its equal share over all lanes (at least 1, at most
        ``max_batch``). Frames that start together split evenly over the free lanes; a lane that finishes while
        the others are busy leaves their share waiting for them, so they do not idle while their clients' next
        frames are on their way."""
        return min(self.max_batch, max(1, -(-queued // self.parallel)))

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batches = []
        with self._lock:
            take = self._share(len(self._pending))
            while self.running < self.parallel and self._pending:
                batch, self._pending = self._pending[:take], self._pending[take:]
                batches.append(batch)
                self.running += 1
                self._running_frames += len(batch)
        loop = asyncio.get_running_loop()
        for batch in batches:
            task = loop.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Slot]) -> None:
        await anyio.to_thread.run_sync(self._lane, batch, asyncio.get_running_loop())
        self._flush()  # frames that came while every lane was busy and none was taken: run them now

    def _lane(self, batch: list[_Slot], loop: asyncio.AbstractEventLoop) -> None:
        """A lane's thread: run ``batch``, hand its results to the loop, take what is pending; until none is."""
        while batch:
            try:
                results: list = run_frames(self.detector, [s.job for s in batch], self.model_id)
            except BaseException as exc:  # noqa: BLE001 - every waiting request must hear of it
                results = [exc] * len(batch)
            with self._lock:
                self.batches += 1
                self.frames += len(batch)
                self._running_frames -= len(batch)
                take = self._share(len(self._pending)) if self._pending else 0
                done, batch = batch, self._pending[:take]
                del self._pending[:take]
                self._running_frames += len(batch)
                if not batch:
                    self.running -= 1
            try:
                loop.call_soon_threadsafe(_deliver, done, results)
            except RuntimeError:  # the loop is closed (shutdown): nobody is waiting any more
                return


def _deliver(batch: list[_Slot], results: list) -> None:
    for slot, result in zip(batch, results):
        if slot.future.done():
            continue
        if isinstance(result, BaseException):
            slot.future.set_exception(result)
        else:
            slot.future.set_result(result)


class Arrival:
    """A request counted as on its way to a model's batcher (see :meth:`DetectorPool.arriving`)."""

    def __init__(self, pool: "DetectorPool", model_id: str):
        self.pool, self.model_id, self.left = pool, model_id, False
        pool._coming[model_id] += 1

    def leave(self, poke: bool = True) -> None:
        if not self.left:
            self.left = True
            self.pool._left(self.model_id, poke)


class LoadedModel:
    def __init__(self, record: ModelRecord, detector: DetectorLike, batcher: MicroBatcher | None = None):
        self.record, self.detector, self.batcher = record, detector, batcher


class DetectorPool:
    """Model id -> loaded detector, loaded on first use and kept.

    With ``max_batch`` > 1, a model whose file has a dynamic batch axis gets a :class:`MicroBatcher`
    (``LoadedModel.batcher``); a file with a fixed batch of 1, or a stand-in detector, runs one frame per call.
    """

    def __init__(self, registry: ModelRegistry, loader: Loader, max_loaded: int = 4, max_batch: int = 1,
                 batch_wait_s: float = 0.0, batch_parallel: int = 1, inline_when_idle: bool = False):
        self.registry, self.loader, self.max_loaded = registry, loader, max_loaded
        self.max_batch, self.batch_wait_s, self.batch_parallel = max_batch, batch_wait_s, batch_parallel
        self.inline_when_idle = inline_when_idle
        self._loaded: "OrderedDict[str, LoadedModel]" = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._coming: Counter[str] = Counter()

    @contextmanager
    def arriving(self, model_id: str) -> Iterator["Arrival"]:
        """Count a request for ``model_id`` as on its way to the batcher for the ``with`` body (or until it
        hands its frame over: ``MicroBatcher.detect(job, arrival)``)."""
        arrival = Arrival(self, model_id)
        try:
            yield arrival
        finally:
            arrival.leave()

    def _left(self, model_id: str, poke: bool) -> None:
        self._coming[model_id] -= 1
        if self._coming[model_id] <= 0:
            del self._coming[model_id]
        hit = self._loaded.get(model_id)
        if poke and hit is not None and hit.batcher is not None:
            hit.batcher.poke()  # a batch may have been waiting for this request only

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
            batcher = None
            if self.max_batch > 1 and batchable(detector):
                batcher = MicroBatcher(detector, model_id, self.max_batch, self.batch_wait_s,
                                       coming=lambda: self._coming.get(model_id, 0), parallel=self.batch_parallel,
                                       inline=self.inline_when_idle)
            loaded = LoadedModel(record, detector, batcher)
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
        try:
            self._sem.acquire_nowait()  # a free slot: no cancel scope, no trip around the loop
        except anyio.WouldBlock:
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
