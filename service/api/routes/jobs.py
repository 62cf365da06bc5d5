"""``/v1/jobs``: submit, list, inspect, cancel and resume fine-tuning jobs (all need the API key)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import ValidationError

from models.errors import ConfigError, DataError
from service.api.deps import get_registry, get_settings, get_store, key_owner, require_api_key
from service.api.schemas.common import error_responses
from service.api.schemas.jobs import JOB_EXAMPLE, JobCreate, JobList, JobLogs, JobOut
from service.core.config import Settings
from service.core.errors import ConflictError, UnsupportedMediaError
from service.jobs.spec import job_log_path
from service.jobs.store import FINAL_STATES, MAX_OFFSET, STATES, Job, JobStore
from service.jobs import submit
from service.jobs.submit import submit_job
from service.registry import ModelRegistry

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": JobCreate.model_json_schema(), "example": JOB_EXAMPLE},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["dataset"],
                    "properties": {
                        "spec": {"type": "string", "description": "the job as JSON (as in the JSON form, without 'dataset')"},
                        "dataset": {"type": "string", "format": "binary", "description": "a zip in YOLO layout with data.yaml"},
                    },
                }
            },
        },
    }
}


def _invalid(exc: ValidationError) -> ConfigError:
    parts = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()]
    return ConfigError("invalid job: " + "; ".join(parts))


def _parse(raw: str | bytes) -> JobCreate:
    try:
        return JobCreate.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid(exc) from None


def job_out(job: Job) -> JobOut:
    request = job.spec.get("request", {})
    return JobOut(
        id=job.id, name=request.get("name"), state=job.state, created_at=job.created_at, updated_at=job.updated_at,
        started_at=job.started_at, finished_at=job.finished_at, step=job.step, total_steps=job.total_steps,
        progress=job.progress, metrics=job.metrics, memory=job.memory, error=job.error, model_id=job.model_id,
        cancel_requested=job.cancel_requested, attempts=job.attempts, retention_removed=job.retention_removed,
        spec=request,
    )


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    summary="Submit a fine-tuning job (JSON with a dataset path, or multipart with a zip)",
    responses=error_responses(400, 401, 404, 408, 409, 413, 415, 422, 429, 503, 507),
    openapi_extra=_BODY_DOC,
)
async def create_job(
    request: Request,
    response: Response,
    owner: str = Depends(key_owner),
    settings: Settings = Depends(get_settings),
    store: JobStore = Depends(get_store),
    registry: ModelRegistry = Depends(get_registry),
) -> JobOut:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload = None
    if ctype == "application/json":
        spec = _parse(await request.body())
    elif ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=4)
        file = form.get("dataset")
        if file is None or isinstance(file, str):
            raise DataError("a multipart job needs a zip file field named 'dataset' (and the job as JSON in 'spec')")
        raw_spec = form.get("spec") or "{}"
        if not isinstance(raw_spec, str):
            raise DataError("the 'spec' field must be JSON text, not a file")
        spec, upload = _parse(raw_spec), file.file
    else:
        raise UnsupportedMediaError(
            f"unsupported Content-Type {ctype or '(none)'!r}; send the job as application/json, or as "
            "multipart/form-data with 'spec' (JSON) and 'dataset' (a zip)"
        )
    job = await anyio.to_thread.run_sync(lambda: submit_job(
        spec, upload, owner=owner, settings=settings, store=store, registry=registry, checker=request.app.state.checker))
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


@router.get("", response_model=JobList, summary="List jobs, newest first", responses=error_responses(401, 422))
async def list_jobs(
    state: str | None = Query(None, description=f"only jobs in this state: {', '.join(STATES)}"),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    store: JobStore = Depends(get_store),
) -> JobList:
    if state is not None and state not in STATES:
        raise ConfigError(f"unknown state {state!r}; use one of {', '.join(STATES)}")
    jobs = await anyio.to_thread.run_sync(lambda: store.list(state=state, limit=limit, offset=offset))
    return JobList(jobs=[job_out(j) for j in jobs])


@router.get("/{job_id}", response_model=JobOut, summary="A job's state, progress, metrics and memory report",
            responses=error_responses(401, 404))
async def get_job(job_id: str, store: JobStore = Depends(get_store)) -> JobOut:
    return job_out(await anyio.to_thread.run_sync(store.get, job_id))


@router.get("/{job_id}/logs", response_model=JobLogs, summary="The last lines of a job's log",
            responses=error_responses(401, 404))
async def get_job_logs(
    job_id: str,
    tail: int = Query(200, ge=1, le=10_000, description="how many of the last lines"),
    settings: Settings = Depends(get_settings),
    store: JobStore = Depends(get_store),
) -> JobLogs:
    await anyio.to_thread.run_sync(store.get, job_id)
    path = job_log_path(settings, job_id)

    def read() -> list[str]:
        return path.read_text(errors="replace").splitlines() if path.is_file() else []

    lines = await anyio.to_thread.run_sync(read)
    return JobLogs(id=job_id, lines=lines[-tail:], total_lines=len(lines))


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued job or stop a running one",
             responses=error_responses(401, 404, 409))
async def cancel_job(job_id: str, store: JobStore = Depends(get_store)) -> JobOut:
    job = await anyio.to_thread.run_sync(store.get, job_id)
    if job.state in FINAL_STATES:
        raise ConflictError(f"job {job_id} already {job.state}; only queued, running or interrupted jobs can be cancelled")
    return job_out(await anyio.to_thread.run_sync(store.request_cancel, job_id))


@router.post("/{job_id}/resume", response_model=JobOut,
             summary="Queue an interrupted or failed job again; it continues from its last checkpoint",
             responses=error_responses(401, 404, 409, 429, 507))
async def resume_job(job_id: str, store: JobStore = Depends(get_store),
                     settings: Settings = Depends(get_settings)) -> JobOut:
    """409 when the job is neither interrupted nor failed, or when retention removed what its resume needs (a
    failed job's checkpoints or uploaded dataset, once it is no longer among the newest failed jobs that keep
    theirs): submit it again. A failed job counts against the key's job limit (429) and the disk quota (507)."""
    job = await anyio.to_thread.run_sync(lambda: submit.resume_job(job_id, settings=settings, store=store))
    return job_out(job)

