"""Submitting a job: every check happens here, before anything is queued.

The route hands over the parsed request (and an uploaded zip, if any); this module
checks the key's quota, unpacks the zip under the disk quota, confines the dataset
and the replay set to the data root (every file training will read), checks every
training setting against ``training.settings.BOUNDS`` (torch-free), lets the
library check the rest in its child process (``service.jobs.checker``), and queues
the job. Any refusal leaves nothing behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import IO, Any

from models.errors import DataError
from service.api.schemas.jobs import JobCreate
from service.core.config import Settings
from service.core.errors import ConflictError, InsufficientStorageError, PayloadTooLargeError
from service.jobs.checker import JobChecker
from service.jobs.datasets import extract_dataset_zip, resolve_dataset_path
from service.jobs.retention import job_bytes
from service.jobs.spec import check_train_values, job_dir, train_config_values
from service.jobs.store import Job, JobStore, new_job_id
from service.registry import ModelRegistry


def _copy_upload(upload: IO[bytes], target: Path, limit: int) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(target, "wb") as out:
        while chunk := upload.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise PayloadTooLargeError(f"the dataset zip is larger than the limit of {limit} bytes; upload less")
            out.write(chunk)
    return written


def submit_job(
    spec: JobCreate,
    upload: IO[bytes] | None,
    *,
    owner: str,
    settings: Settings,
    store: JobStore,
    registry: ModelRegistry,
    checker: JobChecker,
) -> Job:
    """Check ``spec`` (and the zip in ``upload``) completely and queue it; raises the error to answer with."""
    if upload is not None and spec.dataset:
        raise DataError("give either 'dataset' in the spec or a zip upload, not both")
    if upload is None and not spec.dataset:
        raise DataError("'dataset' is missing; give a path under the data root or upload a zip (multipart)")
    store.check_owner_room(owner, settings.max_active_jobs_per_key)  # early: before a zip is unpacked
    request = spec.model_dump(mode="json")
    check_train_values(request, train_config_values(request, "data.yaml", "run", resume=False))
    model_id = spec.model_id
    if model_id is not None and registry.exists(model_id):
        raise ConflictError(f"a model {model_id!r} is already registered; choose another model_id")
    root = settings.resolved_data_root
    job_id = new_job_id()
    folder = job_dir(settings, job_id)
    try:
        dataset_bytes = 0
        if upload is not None:
            room = settings.max_active_dataset_bytes - store.active_dataset_bytes()
            if room <= 0:
                raise InsufficientStorageError(
                    "uploaded datasets of queued, running or interrupted jobs fill the disk quota "
                    f"({settings.max_active_dataset_bytes} bytes); wait for jobs to end, cancel an interrupted one, "
                    "or raise GLASSES_VISION_MAX_ACTIVE_DATASET_BYTES"
                )
            zip_path = folder / "upload.zip"
            _copy_upload(upload, zip_path, settings.max_dataset_zip_bytes)
            data_yaml = extract_dataset_zip(zip_path, folder / "dataset", min(settings.max_dataset_unzipped_bytes, room),
                                            settings.max_dataset_zip_entries)
            zip_path.unlink(missing_ok=True)
            dataset_bytes = job_bytes(folder / "dataset")
        else:
            data_yaml = resolve_dataset_path(root, spec.dataset or "")
        replay_yaml = resolve_dataset_path(root, spec.replay, what="replay") if spec.replay else None
        values = train_config_values(request, data_yaml, folder / "run", resume=False, replay_yaml=replay_yaml)
        checker.check(values, request.get("export") or {})
        record: dict[str, Any] = {
            "request": request,
            "data_yaml": str(data_yaml),
            "replay_yaml": str(replay_yaml) if replay_yaml else None,
            "uploaded_dataset": upload is not None,
            "dataset_bytes": dataset_bytes,
            "model_id": model_id or job_id,
            "job_dir": str(folder),
            "owner": owner,
        }
        # checked again with the insert: two submissions at once both passed the checks above
        return store.create(record, job_id=job_id, max_active_per_owner=settings.max_active_jobs_per_key,
                            max_active_dataset_bytes=settings.max_active_dataset_bytes)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def resume_job(job_id: str, *, settings: Settings, store: JobStore) -> Job:
    """Queue an interrupted or failed job again (it continues from its last checkpoint); raises the error to
    answer with. A failed job counts against its key's job limit and the disk quota again, as a new one does;
    one whose checkpoints or uploaded dataset retention removed cannot be resumed (``ConflictError``)."""
    job = store.get(job_id)
    if (job.state == "failed" and job.retention_removed is None and job.spec.get("uploaded_dataset")
            and not Path(job.spec["data_yaml"]).is_file()):
        # removed before the store recorded what retention removes (or by hand): training would fail without it
        raise ConflictError(f"job {job_id} cannot be resumed: its uploaded dataset is gone; submit the job again")
    job = store.requeue_for_resume(job_id, max_active_per_owner=settings.max_active_jobs_per_key,
                                   max_active_dataset_bytes=settings.max_active_dataset_bytes)
    if job.state != "queued" or not job.resume:
        raise ConflictError(f"job {job_id} is {job.state}; only interrupted or failed jobs can be resumed")
    return job
