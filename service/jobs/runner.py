"""Run one job inside a worker process: train, export, verify, register.

Progress and metrics go to the job store as the recipe reports them; every line
also lands in ``<home>/jobs/<id>/job.log`` (served by ``GET /v1/jobs/{id}/logs``).
A stop request (cancel, or the worker shutting down) is passed to the recipe's
``should_stop``; the recipe saves its checkpoint and returns, and the job ends
``cancelled`` or ``interrupted`` (resumable).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from models.errors import GlassesVisionError
from service.core.config import Settings
from service.jobs.spec import build_train_config, job_dir, job_log_path, job_run_dir
from service.jobs.store import Job, JobStore
from service.registry import ModelRegistry

_STEP_KEYS = ("step", "global_step")
_TOTAL_KEYS = ("total_steps", "max_steps", "total")
_NOT_METRICS = ("world_size",)
_CANCEL_POLL_SECONDS = 0.5


def _as_dict(event: Any) -> dict[str, Any]:
    if isinstance(event, dict):
        return event
    if dataclasses.is_dataclass(event) and not isinstance(event, type):
        return dataclasses.asdict(event)
    if hasattr(event, "to_dict"):
        return event.to_dict()
    return {k: v for k, v in vars(event).items() if not k.startswith("_")} if hasattr(event, "__dict__") else {}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _scalar_metrics(data: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in data.items():
        if key in _STEP_KEYS or key in _TOTAL_KEYS or key in _NOT_METRICS:
            continue
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


class JobProgress:
    """The recipe's ``on_event`` callback: events -> job store + job log."""

    def __init__(self, store: JobStore, job_id: str, log: logging.Logger):
        self.store, self.job_id, self.log = store, job_id, log

    def __call__(self, event: Any) -> None:
        data = _as_dict(event)
        step = next((data[k] for k in _STEP_KEYS if isinstance(data.get(k), int)), None)
        total = next((data[k] for k in _TOTAL_KEYS if isinstance(data.get(k), int)), None)
        metrics = _scalar_metrics(data)
        nested = data.get("metrics")
        if isinstance(nested, dict):
            metrics.update(_scalar_metrics(nested))
        memory = data.get("memory")
        memory = _jsonable(_as_dict(memory)) if memory is not None and not isinstance(memory, (int, float, str)) else None
        self.store.update_progress(self.job_id, step=step, total_steps=total, metrics=metrics, memory=memory)
        kind = data.get("event") or data.get("kind") or data.get("type") or type(event).__name__
        shown = " ".join(f"{k}={v:.5g}" for k, v in metrics.items())
        where = "" if step is None else f"[{step}/{total}] " if total else f"[{step}] "
        self.log.info("%s%s %s", where, kind, shown)


class StopCheck:
    """``should_stop`` for the recipe: the worker is stopping, or the job was cancelled (polled at most every 0.5 s)."""

    def __init__(self, store: JobStore, job_id: str, worker_stop: Callable[[], bool]):
        self.store, self.job_id, self.worker_stop = store, job_id, worker_stop
        self._next_poll = 0.0
        self.cancelled = False
        self.stopped = False

    def __call__(self) -> bool:
        if self.worker_stop():
            self.stopped = True
        now = time.monotonic()
        if not self.cancelled and now >= self._next_poll:
            self._next_poll = now + _CANCEL_POLL_SECONDS
            self.cancelled = self.store.cancel_requested(self.job_id)
        return self.stopped or self.cancelled


def _job_logger(settings: Settings, job_id: str) -> tuple[logging.Logger, logging.Handler]:
    path = job_log_path(settings, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger(f"glasses_vision.job.{job_id}")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, handler


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _memory_report(result: Any, run_dir: Path) -> dict[str, Any] | None:
    for attr in ("memory", "memory_report"):
        value = getattr(result, attr, None)
        if value is not None:
            return _jsonable(value.to_dict() if hasattr(value, "to_dict") else _as_dict(value) or str(value))
    summary = _read_json(run_dir / "summary.json") or {}
    if isinstance(summary.get("memory"), dict):
        return summary["memory"]
    if (run_dir / "memory.txt").is_file():
        return {"table": (run_dir / "memory.txt").read_text()}
    return None


def _final_metrics(result: Any, run_dir: Path) -> dict[str, Any]:
    for attr in ("metrics", "final_metrics"):
        value = getattr(result, attr, None)
        if isinstance(value, dict):
            return _jsonable(value)
    summary = _read_json(run_dir / "summary.json") or {}
    return _jsonable(summary.get("metrics", summary))


def _has_checkpoint(run_dir: Path) -> bool:
    from training.checkpoint import find_checkpoint

    try:
        find_checkpoint(run_dir)
    except GlassesVisionError:
        return False
    return True


def run_job(job: Job, settings: Settings, store: JobStore, worker_stop: Callable[[], bool]) -> str:
    """Run ``job`` to its end; returns the final state written to the store."""
    log, handler = _job_logger(settings, job.id)
    request, model_id = job.spec["request"], job.spec["model_id"]
    run_dir = job_run_dir(settings, job.id)
    stop = StopCheck(store, job.id, worker_stop)
    try:
        import torch

        torch.set_num_threads(settings.worker_torch_threads)
        from training.recipe import train

        resume = job.resume and _has_checkpoint(run_dir)
        if job.resume and not resume:
            log.info("no checkpoint was written before the interruption; starting over")
        config = build_train_config(request, job.spec["data_yaml"], run_dir, resume=resume)
        log.info("job %s %s (attempt %d): %s", job.id, "resumed" if resume else "started", job.attempts,
                 json.dumps(request, sort_keys=True))
        result = train(config, on_event=JobProgress(store, job.id, log), should_stop=stop)
        memory = _memory_report(result, run_dir)
        if memory is not None:
            store.update_progress(job.id, memory=memory)
        stopped = getattr(result, "status", "completed") == "stopped"
        if stop.cancelled:
            log.info("cancelled; the last checkpoint is kept in %s", run_dir)
            store.finish(job.id, "cancelled", error="cancelled on request")
            return "cancelled"
        if stopped:
            log.info("stopped because the worker is shutting down; resume continues from the last checkpoint")
            store.mark_interrupted(worker_pid=job.worker_pid, reason="the worker stopped while it was running")
            return "interrupted"
        metrics = _final_metrics(result, run_dir)
        store.update_progress(job.id, metrics=_scalar_metrics(metrics))
        export = dict(request.get("export") or {})
        log.info("training done; exporting %s to ONNX (%s)", run_dir / "merged", json.dumps(export, sort_keys=True))
        from service.jobs.exporting import export_for_registry

        onnx_tmp = job_dir(settings, job.id) / "export" / "model.onnx"
        calibration = job.spec["data_yaml"] if export.get("int8") else None
        info = export_for_registry(
            run_dir, onnx_tmp, imgsz=request.get("imgsz"), opset=export.get("opset"), half=bool(export.get("half")),
            verify=export.get("verify", True), int8_calibration=calibration,
        )
        log.info("exported %s; verification: %s", onnx_tmp, json.dumps(info.get("verification"), default=str))
        ModelRegistry(settings.models_dir).register(
            model_id, onnx_tmp, move=True, source=f"job {job.id}", job_id=job.id,
            base_model=request.get("base_model"), classes=info.get("classes"), imgsz=info.get("imgsz"),
            metrics=metrics, memory=memory, export=info.get("export", {}), verification=info.get("verification"),
            quantization=info.get("quantization"),
        )
        store.finish(job.id, "succeeded", model_id=model_id)
        log.info("registered model %s; job succeeded", model_id)
        return "succeeded"
    except GlassesVisionError as exc:
        log.error("failed: %s", exc)
        store.finish(job.id, "failed", error=f"{type(exc).__name__}: {exc}")
        return "failed"
    except Exception as exc:  # a bug or an environment problem: keep the worker alive, record it on the job
        log.error("failed with an unexpected error:\n%s", traceback.format_exc())
        store.finish(job.id, "failed",
                     error=f"unexpected {type(exc).__name__}: {exc}; see GET /v1/jobs/{job.id}/logs")
        return "failed"
    finally:
        log.removeHandler(handler)
        handler.close()
