"""``GET /v1/jobs/{id}/events``: a job's training progress as Server-Sent Events.

The stream replays the job's ``metrics.jsonl`` (written by the recipe in ``<home>/jobs/<id>/run/``) from
its first line, then follows it as the worker appends to it, and polls the job store for state changes:

* ``event: step``  (``id:`` the step) ``{"step", "total_steps", "epoch", "loss", "lr", "elapsed_s", "eta_s", ...}``
* ``event: eval``  the recipe's evaluation records (``map50``, ``map50_95``, ...)
* ``event: state`` ``{"state", "step", "total_steps", "progress", "error", "model_id"}`` when the state changes
* ``event: end``   the job is ``succeeded``, ``failed``, ``cancelled`` or ``interrupted``; the stream closes

A client that reconnects with ``Last-Event-ID`` (EventSource does) gets only the steps after that one.
Plain file and SQLite reads: no torch in the API process. ``curl -N -H "X-API-Key: $KEY" .../events``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import StreamingResponse

from service.api.deps import get_settings, get_store, require_api_key
from service.api.schemas.common import error_responses
from service.core.config import Settings
from service.jobs.spec import job_run_dir
from service.jobs.store import FINAL_STATES, Job, JobStore

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
RETRY_MS = 2000
END_STATES = (*FINAL_STATES, "interrupted")
_MAX_READ = 4 << 20  # bytes of metrics.jsonl read per poll


class MetricsTail:
    """The complete new lines of a ``metrics.jsonl``; starts over when the file is replaced or cut (a resume)."""

    def __init__(self, path: Path):
        self.path, self.pos, self.partial = path, 0, b""
        self.inode: int | None = None

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                if st.st_ino != self.inode or st.st_size < self.pos:
                    self.inode, self.pos, self.partial = st.st_ino, 0, b""
                fh.seek(self.pos)
                data = fh.read(_MAX_READ)
        except FileNotFoundError:
            return []
        self.pos += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # a line the recipe has not finished writing yet
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


class EtaEstimate:
    """Seconds left from the step rate of the current attempt (a resumed job restarts the recipe's clock)."""

    def __init__(self) -> None:
        self.first: tuple[int, float] | None = None
        self.last_time: float | None = None

    def update(self, step: int, elapsed: float | None, total: int | None) -> float | None:
        if elapsed is None:
            return None
        if self.last_time is not None and elapsed < self.last_time:
            self.first = None  # a new attempt
        self.last_time = elapsed
        if self.first is None:
            self.first = (step, elapsed)  # its time includes building the model and data: not a rate
            return None
        steps, seconds = step - self.first[0], elapsed - self.first[1]
        if not total or steps <= 0 or seconds < 0:
            return None
        return round(max(0, total - step) * seconds / steps, 1)


class _ChainedHandler:
    """A SIGINT / SIGTERM handler that sets a stop event, then runs the handler it was put in front of."""

    def __init__(self, event: threading.Event, previous: Callable[[int, Any], Any]):
        self.event, self.previous = event, previous

    def __call__(self, signum: int, frame: Any) -> None:
        self.event.set()
        self.previous(signum, frame)


class StopSignal:
    """Set when the process is asked to stop (SIGINT / SIGTERM), so that open event streams end at once.

    uvicorn waits for responses still being sent before it stops, so a stream following a running job would
    hold Ctrl-C for the whole graceful-shutdown timeout and then be cancelled. The handler is chained in front
    of the server's own (it still runs); installed from the main thread only, where servers catch signals.
    """

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        """Chain the handlers unless they are in place (a server that stopped restores the ones it found)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if isinstance(previous, _ChainedHandler):
                continue
            if not callable(previous):  # no Python handler to chain (default or ignored): leave it alone
                continue
            self.event.clear()  # a new server: an earlier one's stop does not count
            signal.signal(sig, _ChainedHandler(self.event, previous))


STOPPING = StopSignal()


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _sse(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _state_data(job: Job) -> dict[str, Any]:
    return {"state": job.state, "step": job.step, "total_steps": job.total_steps, "progress": job.progress,
            "error": job.error, "model_id": job.model_id}


def _parse_last_id(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


async def job_events(
    store: JobStore, job: Job, run_dir: Path, last_step: int = 0, poll: float = POLL_SECONDS,
    stopping: threading.Event | None = None,
) -> AsyncIterator[str]:
    """The SSE text of one job until it ends, or until ``stopping`` is set (see the module docstring)."""
    tail, eta = MetricsTail(run_dir / "metrics.jsonl"), EtaEstimate()
    total = job.total_steps
    yield f"retry: {RETRY_MS}\n\n"
    yield _sse("state", _state_data(job))
    state, last_sent = (job.state, job.error), time.monotonic()
    while True:
        ended = job.state in END_STATES  # read the file once more after the end: the last lines are in it
        for record in await anyio.to_thread.run_sync(tail.read):
            kind, step = record.get("kind"), record.get("step")
            if not isinstance(step, int):
                continue
            if kind == "train":
                total = job.total_steps or total
                remaining = eta.update(step, _number(record.get("time_s")), total)
                if step <= last_step:
                    continue
                last_step = step
                data = {"step": step, "total_steps": total, "epoch": record.get("epoch"),
                        "loss": _number(record.get("loss")), "lr": _number(record.get("lr")),
                        "elapsed_s": _number(record.get("time_s")), "eta_s": remaining}
                data.update({k: _number(v) for k, v in record.items()  # the loss parts, grad_norm, ...
                             if k not in data and k not in ("kind", "time_s") and _number(v) is not None})
                yield _sse("step", data, event_id=step)
                last_sent = time.monotonic()
            elif kind == "eval" and step >= last_step:
                yield _sse("eval", {k: v for k, v in record.items() if k == "step" or _number(v) is not None})
                last_sent = time.monotonic()
        if ended:
            yield _sse("end", _state_data(job))
            return
        await anyio.sleep(poll)
        if stopping is not None and stopping.is_set():
            return  # the server is stopping: no end event, so a client reconnects (with Last-Event-ID) later
        job = await anyio.to_thread.run_sync(store.get, job.id)
        if (job.state, job.error) != state:
            state = (job.state, job.error)
            yield _sse("state", _state_data(job))
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"  # a comment line: keeps proxies from closing an idle stream
            last_sent = time.monotonic()


@router.get(
    "/{job_id}/events",
    summary="A job's training progress as Server-Sent Events (step, loss, lr, ETA), until it ends",
    response_class=StreamingResponse,
    responses={
        **error_responses(401, 404),
        200: {"content": {"text/event-stream": {"example": 'id: 3\nevent: step\ndata: {"step":3,"total_steps":10,'
                                                           '"loss":4.2,"lr":0.001,"eta_s":12.5}\n\n'}}},
    },
)
async def job_events_stream(
    job_id: str,
    request: Request,
    last_event_id: str | None = Header(None, description="resume after this step (sent by EventSource)"),
    settings: Settings = Depends(get_settings),
    store: JobStore = Depends(get_store),
) -> StreamingResponse:
    job = await anyio.to_thread.run_sync(store.get, job_id)  # 404 before the stream starts
    STOPPING.install()
    stream = job_events(store, job, job_run_dir(settings, job_id), last_step=_parse_last_id(last_event_id),
                        stopping=STOPPING.event)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
