"""The FastAPI application: ``create_app(settings)`` and the module-level ``app``.

Nothing touches the disk until the app starts (lifespan): then the home folder,
the job store and the model registry are opened, running jobs left over from a
previous process whose worker is gone are marked interrupted (those whose worker
still runs are left to it, and watched), the job workers are started, and the
default model is exported (first start only, in a child process) and loaded in
the background. ``/healthz`` answers at once; ``/readyz`` once the default model
is loaded.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

import anyio
from fastapi import FastAPI

from service.api.routes import detect, events, health, jobs, models, ui
from service.core.config import Settings
from service.core.errors import install_error_handlers
from service.core.inference import DetectorPool, InFlightLimiter, Loader, runtime_loader
from service.api.openapi import install_openapi
from service.core.images import DecodeBudget
from service.core.limits import BodySizeLimitMiddleware
from service.core.memory import return_large_blocks
from service.core.metrics import Metrics, MetricsMiddleware
from service.core.security import load_api_keys, prepare_home
from service.jobs.checker import shared_checker
from service.jobs.retention import prune_job_files
from service.jobs.bootstrap import ensure_default_model
from service.jobs.store import JobStore
from service.jobs.supervisor import WorkerSupervisor
from service.registry import ModelRegistry

log = logging.getLogger("glasses_vision.service")
API_VERSION = "0.1.0"
# Buffers from this size up get their own mapping, returned at once when freed. Below it stay a detect's float
# intermediates (a 640x480 frame at 128 px: ~0.9 MB), which would otherwise be mapped and page-faulted afresh on
# every request (~150 faults, ~0.4 ms of the request); large uploads' frames are well above it.
LARGE_BLOCK_BYTES = 1 << 20


async def _prepare_default_model(app: FastAPI) -> None:
    settings: Settings = app.state.settings
    try:
        await anyio.to_thread.run_sync(ensure_default_model, settings, app.state.registry)
        await app.state.pool.get(settings.default_model)
        app.state.ready = True
        log.info("default model %s loaded; ready", settings.default_model)
    except Exception as exc:  # reported by /readyz; the service keeps serving other models
        app.state.startup_error = f"{type(exc).__name__}: {exc}"
        log.error("default model %s not ready: %s", settings.default_model, app.state.startup_error)


async def _watch_workers(supervisor: WorkerSupervisor, interval: float = 1.0) -> None:
    """Check the job workers every ``interval`` s for the app's life; a failed check (a locked database, a worker
    that cannot be started) is logged and tried again, so dead workers are still replaced afterwards."""
    while True:
        await asyncio.sleep(interval)
        try:
            await anyio.to_thread.run_sync(supervisor.check)
        except Exception:
            log.exception("checking the job workers failed; trying again in %g s", interval)


def create_app(settings: Settings | None = None, detector_loader: Loader | None = None) -> FastAPI:
    """Build the app. ``detector_loader`` (path -> detector) defaults to ``export.runtime.Detector``."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        prepare_home(settings)
        settings.resolved_data_root.mkdir(parents=True, exist_ok=True)
        store = JobStore(settings.db_path)
        return_large_blocks(threshold=LARGE_BLOCK_BYTES)
        interrupted, orphaned = store.mark_abandoned(reason="the service restarted while it was running")
        if interrupted:
            log.warning("marked %d job(s) interrupted: %s", len(interrupted), ", ".join(interrupted))
        if orphaned:
            log.warning("%d job(s) still run in a worker this process did not start; left to it: %s",
                        len(orphaned), ", ".join(orphaned))
        registry = ModelRegistry(settings.models_dir)
        app.state.store, app.state.registry = store, registry
        app.state.api_keys = load_api_keys(settings)
        app.state.pool = DetectorPool(
            registry, detector_loader or runtime_loader(settings.inference_threads), settings.max_loaded_models,
            max_batch=settings.detect_batch_size, batch_wait_s=settings.detect_batch_wait_ms / 1000.0,
            batch_parallel=settings.detect_batch_parallel, inline_when_idle=settings.detect_inline_when_idle,
        )
        app.state.limiter = InFlightLimiter(
            settings.max_concurrent_inference, settings.inference_queue, settings.inference_queue_timeout_s
        )
        app.state.decode_budget = DecodeBudget(settings.max_decode_bytes_in_flight)
        app.state.checker = shared_checker()
        if settings.job_workers:
            app.state.checker.warm()  # the library's job checks import torch in a child: start it now
        await anyio.to_thread.run_sync(prune_job_files, settings, store)
        supervisor = WorkerSupervisor(settings, store)
        supervisor.adopt(orphaned)
        supervisor.start()
        app.state.supervisor = supervisor
        tasks = [asyncio.create_task(_watch_workers(supervisor))]
        if settings.load_default_model:
            tasks.append(asyncio.create_task(_prepare_default_model(app)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await anyio.to_thread.run_sync(supervisor.stop)

    app = FastAPI(
        title="Glasses Vision",
        version=API_VERSION,
        summary="Object detection for smart-glasses footage: inference, a model registry and fine-tuning jobs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.ready = False
    app.state.startup_error = None
    install_error_handlers(app)
    install_openapi(app, settings)
    app.add_middleware(BodySizeLimitMiddleware, settings=settings)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    for router in (detect.router, models.router, jobs.router, events.router, health.router, ui.router):
        app.include_router(router)
    return app


app = create_app()
