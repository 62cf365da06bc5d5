"""Run one job inside a worker process: train, export, verify, register.

Progress and metrics go to the job store as the recipe reports them; every line
also lands in ``<home>/jobs/<id>/job.log`` (served by ``GET /v1/jobs/{id}/logs``).
A stop request (cancel, or the worker shutting down) is passed to the recipe's
``should_stop``; the recipe saves its checkpoint and returns, and the job ends
``cancelled`` or ``interrupted`` (resumable).

Every write to the job (progress, its end, the model it registers) is made only
while the job is still running in this worker under this claim (its pid and
``Job.attempts``); a job taken from it (marked interrupted, resumed, claimed again -
by another worker or by this one) is stopped at the next step and left as it is.
The model's registration is prepared (moved, hashed, described) before the store's
write lock is taken; under it the prepared folder is only renamed into place.
Each attempt trains in its own folder (``service.jobs.attempts``): what a worker
that lost its job writes until it stops (its stop checkpoint, its outputs) lands in
its own attempt's folder, never in the one the attempt that took over trains in.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from models.errors import GlassesVisionError
from service.core.config import Settings
from service.jobs.attempts import start_attempt
from service.jobs.datasets import resolve_dataset_path
from service.jobs.retention import prepared_model_folder, prune_job_files
from service.jobs.spec import build_train_config, job_dir, job_log_path
from service.jobs.store import Job, JobStore
from service.registry import ModelRegistry

if TYPE_CHECKING:
    from training.recipe import TrainResult

_NOT_METRICS = ("step", "total_steps", "world_size")
_CANCEL_POLL_SECONDS = 0.5
#: environment variables pointed at the job's own temporary folder while it runs (torch.compile, triton, ...).
_TEMP_VARS = ("TMPDIR", "TEMP", "TMP", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
#: every job's lines go through this one logger (to the worker's own log too); a per-job logger would stay in
#: ``logging``'s registry for the life of the process, one more for every job a worker runs.
job_log = logging.getLogger("glasses_vision.job")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _scalar_metrics(data: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in data.items():
        if key in _NOT_METRICS:
            continue
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


class JobProgress:
    """The recipe's ``on_event`` callback (``training.recipe.EventFn``): events -> job store + job log, while
    the job still runs in this worker."""

    def __init__(self, store: JobStore, job: Job, log: logging.Logger):
        self.store, self.job, self.log = store, job, log

    def __call__(self, event: dict[str, Any]) -> None:
        step = event.get("step") if isinstance(event.get("step"), int) else None
        total = event.get("total_steps") if isinstance(event.get("total_steps"), int) else None
        metrics = _scalar_metrics(event)
        nested = event.get("metrics")
        if isinstance(nested, dict):
            metrics.update(_scalar_metrics(nested))
        memory = event.get("memory")
        memory = _jsonable(memory) if isinstance(memory, dict) else None
        if not self.store.update_progress(self.job.id, step=step, total_steps=total, metrics=metrics, memory=memory,
                                          worker_pid=self.job.worker_pid, attempt=self.job.attempts):
            return  # taken from this worker: StopCheck stops the run
        kind = event.get("event", "event")
        shown = " ".join(f"{k}={v:.5g}" for k, v in metrics.items())
        where = "" if step is None else f"[{step}/{total}] " if total else f"[{step}] "
        self.log.info("%s%s %s", where, kind, shown)


@contextmanager
def prepared_model(registry: ModelRegistry, job: Job, model_id: str, onnx_file: Path, **meta: Any
                   ) -> Iterator[Callable[[], None]]:
    """Prepare the registration of ``onnx_file`` (moved) as ``model_id`` in a hidden folder of this attempt, and
    yield the function that publishes it (renames it into place: quick). What was not published when the ``with``
    body ends is discarded; so is a publication the body then fails after (the job's success was not recorded)."""
    prepared = registry.prepare(model_id, onnx_file, move=True, staging=prepared_model_folder(job.id, job.attempts),
                                **meta)

    def publish() -> None:
        registry.publish(prepared)

    try:
        yield publish
    except BaseException:
        registry.discard(prepared)
        raise
    if not prepared.published:
        registry.discard(prepared)


@contextmanager
def job_temp_dir(folder: Path, remove: Callable[[], bool] = lambda: True) -> Iterator[Path]:
    """Point every temporary file of the job (Python's ``tempfile``, torch.compile's caches) at ``folder``,
    and remove it afterwards unless ``remove()`` says no (another worker uses it now): nothing is left in the
    system's temporary folder."""
    folder.mkdir(parents=True, exist_ok=True)
    saved_env = {name: os.environ.get(name) for name in _TEMP_VARS}
    saved_tempdir = tempfile.tempdir
    for name in _TEMP_VARS:
        os.environ[name] = str(folder)
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = saved_tempdir
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if remove():
            shutil.rmtree(folder, ignore_errors=True)


class StopCheck:
    """``should_stop`` for the recipe: the worker is stopping, the job was cancelled, or it was taken from this
    worker (the store is polled at most every 0.5 s)."""

    def __init__(self, store: JobStore, job: Job, worker_stop: Callable[[], bool]):
        self.store, self.job, self.worker_stop = store, job, worker_stop
        self._next_poll = 0.0
        self.cancelled = False
        self.stopped = False
        self.taken = False

    def __call__(self) -> bool:
        if self.worker_stop():
            self.stopped = True
        now = time.monotonic()
        if not (self.cancelled or self.taken) and now >= self._next_poll:
            self._next_poll = now + _CANCEL_POLL_SECONDS
            current = self.store.get(self.job.id)  # one read for both questions
            self.cancelled = current.cancel_requested
            claim = (self.job.worker_pid, self.job.attempts)
            self.taken = self.job.worker_pid is not None and (
                current.state != "running" or (current.worker_pid, current.attempts) != claim)
        return self.stopped or self.cancelled or self.taken


class _FromThread(logging.Filter):
    """Passes the records logged by one thread: the job's file gets only the lines of the job run there."""

    def __init__(self, thread_id: int):
        super().__init__()
        self.thread_id = thread_id

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.thread_id


@contextmanager
def job_logging(settings: Settings, job_id: str) -> Iterator[logging.Logger]:
    """``job_log`` writing to ``job.log`` of ``job_id`` (the lines this thread logs) for the ``with`` body;
    the file is closed and the handler removed afterwards."""
    path = job_log_path(settings, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(_FromThread(threading.get_ident()))
    job_log.setLevel(logging.INFO)
    job_log.addHandler(handler)
    try:
        yield job_log
    finally:
        job_log.removeHandler(handler)
        handler.close()


def _recheck_datasets(job: Job, settings: Settings) -> None:
    """The data root may have changed since submission: confine the job's datasets again before reading them."""
    root = settings.resolved_data_root
    if not job.spec.get("uploaded_dataset"):  # an upload lives in the job's own folder; its replay set does not
        resolve_dataset_path(root, job.spec["data_yaml"])
    if job.spec.get("replay_yaml"):
        resolve_dataset_path(root, job.spec["replay_yaml"], what="replay")


def run_job(job: Job, settings: Settings, store: JobStore, worker_stop: Callable[[], bool]) -> str:
    """Run ``job`` to its end; returns the final state written to the store."""
    # a worker that lost its job leaves the temporary folder to the worker that runs the job now
    in_use = job_temp_dir(job_dir(settings, job.id) / "tmp", remove=lambda: not _runs_elsewhere(store, job))
    try:
        with job_logging(settings, job.id) as log, in_use:
            return _run(job, settings, store, worker_stop, log)
    finally:
        try:
            prune_job_files(settings, store)
        except OSError as exc:  # retention must never fail the job
            job_log.warning("could not remove ended jobs' files: %s", exc)


def _runs_elsewhere(store: JobStore, job: Job) -> bool:
    """Whether ``job`` was queued again or runs under another claim (than the one ``job`` names)."""
    now = store.get(job.id)
    return now.state == "queued" or (
        now.state == "running" and (now.worker_pid, now.attempts) != (job.worker_pid, job.attempts))


def _not_recorded(store: JobStore, job: Job, log: logging.Logger, what: str) -> str:
    """Say that ``what`` of a job taken from this worker is not recorded; returns the state the job is in."""
    now = store.get(job.id).state
    log.warning("the job is %s, no longer running in this worker (pid %s) as attempt %d: %s is not recorded",
                now, job.worker_pid, job.attempts, what)
    return now


def _finish(store: JobStore, job: Job, state: str, log: logging.Logger, error: str | None = None,
            model_id: str | None = None) -> str:
    """Record the job's end unless it was taken from this worker meanwhile; returns the state it is in."""
    if store.finish(job.id, state, error=error, model_id=model_id, worker_pid=job.worker_pid, attempt=job.attempts):
        return state
    return _not_recorded(store, job, log, f"its end ({state})")


def _run(job: Job, settings: Settings, store: JobStore, worker_stop: Callable[[], bool], log: logging.Logger) -> str:
    request, model_id = job.spec["request"], job.spec["model_id"]
    stop = StopCheck(store, job, worker_stop)
    try:
        import torch

        torch.set_num_threads(settings.worker_torch_threads)
        from training.recipe import train

        _recheck_datasets(job, settings)
        run_dir, resume = start_attempt(settings, job)
        if job.resume and not resume:
            log.info("no checkpoint was written before the interruption; starting over")
        config = build_train_config(request, job.spec, run_dir, resume=resume)
        log.info("job %s %s (attempt %d): %s", job.id, "resumed" if resume else "started", job.attempts,
                 json.dumps(request, sort_keys=True))
        result: TrainResult = train(config, on_event=JobProgress(store, job, log), should_stop=stop)
        if stop.taken:
            return _not_recorded(store, job, log, "the rest of its run (stopped at the next step)")
        memory = _jsonable(result.memory) if result.memory else None
        if memory is not None:
            store.update_progress(job.id, memory=memory, worker_pid=job.worker_pid, attempt=job.attempts)
        # a cancel that came within the last poll interval, as the worker stopped, is still a cancel
        if stop.cancelled or (result.status == "stopped" and store.cancel_requested(job.id)):
            log.info("cancelled; the run's files are removed")
            return _finish(store, job, "cancelled", log, error="cancelled on request")
        if result.status == "stopped":
            log.info("stopped because the worker is shutting down; resume continues from the last checkpoint")
            if job.id in store.mark_interrupted(job.worker_pid, "the worker stopped while it was running",
                                                attempt=job.attempts):
                return "interrupted"
            return _not_recorded(store, job, log, "its interruption")
        metrics = _jsonable(result.metrics)
        if not store.update_progress(job.id, step=result.steps, total_steps=result.total_steps,
                                     metrics=_scalar_metrics(metrics), worker_pid=job.worker_pid,
                                     attempt=job.attempts):
            return _not_recorded(store, job, log, "its result (no export, no model)")
        export = dict(request.get("export") or {})
        log.info("training done; exporting %s to ONNX (%s)", result.merged_dir, json.dumps(export, sort_keys=True))
        from service.jobs.exporting import export_for_registry

        onnx_tmp = job_dir(settings, job.id) / "export" / str(job.attempts) / "model.onnx"  # one per attempt too
        calibration = job.spec["data_yaml"] if export.get("int8") else None
        info = export_for_registry(
            run_dir, onnx_tmp, imgsz=request.get("imgsz"), opset=export.get("opset"), half=bool(export.get("half")),
            verify=export.get("verify", True), int8_calibration=calibration,
        )
        log.info("exported %s; verification: %s", onnx_tmp, json.dumps(info.get("verification"), default=str))
        # prepared outside the store's write lock (the file moved, hashed, described: seconds for a large model),
        # published only if the job is still this worker's, in the transaction that records it succeeded: a job
        # taken from it meanwhile leaves no model behind (the prepared folder is removed), a failed publication
        # no succeeded job
        with prepared_model(ModelRegistry(settings.models_dir), job, model_id, onnx_tmp, source=f"job {job.id}",
                            job_id=job.id, base_model=request.get("base_model"), classes=info.get("classes"),
                            imgsz=info.get("imgsz"), metrics=metrics, memory=memory, export=info.get("export", {}),
                            verification=info.get("verification"), quantization=info.get("quantization")) as publish:
            with store.finishing(job.id, "succeeded", model_id=model_id, worker_pid=job.worker_pid,
                                 attempt=job.attempts) as its_own:
                if its_own:
                    publish()
        if not its_own:
            return _not_recorded(store, job, log, f"its model ({model_id}, not registered) and its end (succeeded)")
        log.info("registered model %s; job succeeded", model_id)
        return "succeeded"
    except GlassesVisionError as exc:
        log.error("failed: %s", exc)
        return _finish(store, job, "failed", log, error=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a bug or an environment problem: keep the worker alive, record it on the job
        log.error("failed with an unexpected error:\n%s", traceback.format_exc())
        return _finish(store, job, "failed", log, error=f"unexpected {type(exc).__name__}: {exc}; see the job's log")
