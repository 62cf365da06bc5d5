"""``/v1/jobs``: submit, list, inspect, cancel and resume fine-tuning jobs (all need the API key)."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import ValidationError

from models.errors import ConfigError, DataError
from service.api.deps import get_registry, get_settings, get_store, require_api_key
from service.api.schemas.common import error_responses
from service.api.schemas.jobs import JOB_EXAMPLE, JobCreate, JobList, JobLogs, JobOut
from service.core.config import Settings
from service.core.errors import ConflictError, PayloadTooLargeError, UnsupportedMediaError
from service.jobs.datasets import extract_dataset_zip, resolve_dataset_path
from service.jobs.spec import job_log_path, validate_job
from service.jobs.store import STATES, Job, JobStore, new_job_id
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


def job_out(job: Job) -> JobOut:
    request = job.spec.get("request", {})
    return JobOut(
        id=job.id, name=request.get("name"), state=job.state, created_at=job.created_at, updated_at=job.updated_at,
        started_at=job.started_at, finished_at=job.finished_at, step=job.step, total_steps=job.total_steps,
        progress=job.progress, metrics=job.metrics, memory=job.memory, error=job.error, model_id=job.model_id,
        cancel_requested=job.cancel_requested, attempts=job.attempts, spec=request,
    )


def _copy_upload(upload, target: Path, limit: int) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(target, "wb") as out:
        while chunk := upload.file.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise PayloadTooLargeError(f"the dataset zip is larger than the limit of {limit} bytes; upload less")
            out.write(chunk)
    return written


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    summary="Submit a fine-tuning job (JSON with a dataset path, or multipart with a zip)",
    responses=error_responses(401, 404, 413, 415, 422),
    openapi_extra=_BODY_DOC,
)
async def create_job(
    request: Request,
    response: Response,
    settings: Settings = Depends(get_settings),
    store: JobStore = Depends(get_store),
    registry: ModelRegistry = Depends(get_registry),
) -> JobOut:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    job_id = new_job_id()
    job_dir = settings.jobs_dir / job_id
    try:
        if ctype == "application/json":
            try:
                spec = JobCreate.model_validate_json(await request.body())
            except ValidationError as exc:
                raise _invalid(exc) from None
            if not spec.dataset:
                raise DataError("'dataset' is missing; give a path under the data root or upload a zip (multipart)")
            data_yaml = await anyio.to_thread.run_sync(resolve_dataset_path, settings.resolved_data_root, spec.dataset)
            uploaded = False
        elif ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("dataset")
            if upload is None or isinstance(upload, str):
                raise DataError("a multipart job needs a zip file field named 'dataset' (and the job as JSON in 'spec')")
            raw_spec = form.get("spec") or "{}"
            if not isinstance(raw_spec, str):
                raise DataError("the 'spec' field must be JSON text, not a file")
            try:
                spec = JobCreate.model_validate_json(raw_spec)
            except ValidationError as exc:
                raise _invalid(exc) from None
            if spec.dataset:
                raise DataError("give either 'dataset' in the spec or a zip upload, not both")
            zip_path = job_dir / "upload.zip"
            await anyio.to_thread.run_sync(_copy_upload, upload, zip_path, settings.max_dataset_zip_bytes)
            data_yaml = await anyio.to_thread.run_sync(
                extract_dataset_zip, zip_path, job_dir / "dataset",
                settings.max_dataset_unzipped_bytes, settings.max_dataset_zip_entries,
            )
            zip_path.unlink(missing_ok=True)
            uploaded = True
        else:
            raise UnsupportedMediaError(
                f"unsupported Content-Type {ctype or '(none)'!r}; send the job as application/json, or as "
                "multipart/form-data with 'spec' (JSON) and 'dataset' (a zip)"
            )
        model_id = spec.model_id or job_id
        if registry.exists(model_id):
            raise ConflictError(f"a model {model_id!r} is already registered; choose another model_id")
        await anyio.to_thread.run_sync(validate_job, spec, data_yaml, settings)
        record = {
            "request": spec.model_dump(mode="json"),
            "data_yaml": str(data_yaml),
            "uploaded_dataset": uploaded,
            "model_id": model_id,
            "job_dir": str(job_dir),
        }
        job = await anyio.to_thread.run_sync(lambda: store.create(record, job_id=job_id))
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


@router.get("", response_model=JobList, summary="List jobs, newest first", responses=error_responses(401, 422))
async def list_jobs(
    state: str | None = Query(None, description=f"only jobs in this state: {', '.join(STATES)}"),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
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
    if job.state in ("succeeded", "failed", "cancelled"):
        raise ConflictError(f"job {job_id} already {job.state}; only queued, running or interrupted jobs can be cancelled")
    return job_out(await anyio.to_thread.run_sync(store.request_cancel, job_id))


@router.post("/{job_id}/resume", response_model=JobOut,
             summary="Queue an interrupted or failed job again; it continues from its last checkpoint",
             responses=error_responses(401, 404, 409))
async def resume_job(job_id: str, store: JobStore = Depends(get_store)) -> JobOut:
    job = await anyio.to_thread.run_sync(store.requeue_for_resume, job_id)
    if job.state != "queued" or not job.resume:
        raise ConflictError(f"job {job_id} is {job.state}; only interrupted or failed jobs can be resumed")
    return job_out(job)

