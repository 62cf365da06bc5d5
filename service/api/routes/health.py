"""Liveness (``/healthz``), readiness (``/readyz``) and Prometheus metrics (``/metrics``)."""

from __future__ import annotations

import time

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from service.api.deps import get_metrics, get_settings
from service.api.schemas.common import error_responses
from service.api.schemas.health import HealthOut, ReadyOut
from service.core.config import Settings
from service.core.errors import NotReadyError
from service.core.metrics import Metrics

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="The process is up")
async def healthz(request: Request, settings: Settings = Depends(get_settings)) -> HealthOut:
    supervisor = getattr(request.app.state, "supervisor", None)
    return HealthOut(
        job_workers_alive=supervisor.alive() if supervisor else 0, job_workers_configured=settings.job_workers
    )


@router.get("/readyz", response_model=ReadyOut, summary="The default model is loaded", responses=error_responses(503))
async def readyz(request: Request, settings: Settings = Depends(get_settings)) -> ReadyOut:
    if not getattr(request.app.state, "ready", False):
        problem = getattr(request.app.state, "startup_error", None)
        if problem:
            raise NotReadyError(f"the default model {settings.default_model!r} could not be prepared: {problem}")
        raise NotReadyError(f"the default model {settings.default_model!r} is still being exported or loaded")
    supervisor = getattr(request.app.state, "supervisor", None)
    store = getattr(request.app.state, "store", None)
    if supervisor is not None and store is not None:
        problem = await anyio.to_thread.run_sync(unseen_workers, supervisor, store, settings)
        if problem:
            raise NotReadyError(problem)
    return ReadyOut(default_model=settings.default_model)


def unseen_workers(supervisor, store, settings: Settings) -> str | None:
    """Why the job workers are not ready (a live worker has not polled the API's job database lately), or None."""
    now = time.time()
    for pid in supervisor.pids():
        seen = store.worker_seen(pid)
        if seen is None or now - seen > settings.worker_heartbeat_timeout_s:
            return (f"job worker {pid} has not polled the service's job database "
                    f"{'yet' if seen is None else f'for {now - seen:.0f} s'}; jobs will not run until it does "
                    "(see <home>/logs/worker-*.log)")
    return None


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics: requests, latencies, inference time, job counts",
    responses={200: {"content": {"text/plain": {"example": "glasses_vision_jobs{state=\"queued\"} 2\n"}}}},
)
async def metrics(request: Request, metrics: Metrics = Depends(get_metrics)) -> PlainTextResponse:
    store = getattr(request.app.state, "store", None)
    counts = await anyio.to_thread.run_sync(store.counts) if store else {}
    pool = getattr(request.app.state, "pool", None)
    limiter = getattr(request.app.state, "limiter", None)
    text = metrics.render(counts, len(pool.loaded_ids()) if pool else 0, limiter.in_flight if limiter else 0)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")
