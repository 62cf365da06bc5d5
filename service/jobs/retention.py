"""What a job leaves on disk once it ends, and for how long.

A succeeded job's model is in the registry and a cancelled job cannot be resumed: their
run folder (checkpoints, merged weights), export staging, temporary files and uploaded
dataset are removed, and only ``job.log`` stays. A failed job can be resumed from its
last checkpoint, so the runs of the ``keep_failed_runs`` jobs that failed last are kept
and older ones are removed the same way. Queued, running and interrupted jobs keep
everything: a job's files are removed under the job store's write lock, after checking
that the job is still in the state it was chosen in, so a failed job resumed meanwhile
keeps its checkpoints. When that removal takes what a resume needs (the run's
checkpoints, the uploaded dataset), the job records it and can no longer be resumed.

A worker prepares its model's registration in a hidden registry folder of its attempt
(``models/.job-<id>.<attempt>``) and publishes or discards it; one killed in between
leaves the folder behind, which is removed once that job no longer runs in that attempt.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from models.errors import NotFoundError
from service.core.config import Settings
from service.jobs.store import Job, JobStore
from service.registry import ModelRegistry

log = logging.getLogger("glasses_vision.service")

#: folders of ``<home>/jobs/<id>/`` that retention removes (``job.log`` stays); ``run`` links to an attempt's folder.
BULKY = ("run", "attempts", "dataset", "export", "tmp")
_PREPARED_RE = re.compile(r"^\.job-(?P<job_id>.+)\.(?P<attempt>\d+)$")


def prepared_model_folder(job_id: str, attempt: int) -> str:
    """The hidden registry folder a job's attempt prepares its model's registration in."""
    return f".job-{job_id}.{attempt}"


def job_bytes(folder: Path) -> int:
    """Bytes of the regular files below ``folder`` (symlinks not followed)."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def remove_bulky(settings: Settings, job_id: str) -> bool:
    """Remove a job's run, attempts, dataset, export and temporary folders; True if anything was removed."""
    root = settings.jobs_dir / job_id
    removed = False
    for name in BULKY:
        target = root / name
        if target.is_symlink():
            target.unlink()
            removed = True
        elif target.exists():
            shutil.rmtree(target, ignore_errors=True)
            removed = True
    return removed


def needed_to_resume(settings: Settings, job: Job) -> str | None:
    """What of ``job``'s files a resume needs and would lose with them (None: a resume would start over as it
    would anyway): the run's checkpoints, the uploaded dataset."""
    root = settings.jobs_dir / job.id
    checkpoints = root / "run" / "checkpoints"
    needed = []
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        needed.append("run's checkpoints")
    if job.spec.get("uploaded_dataset") and (root / "dataset").exists():
        needed.append("uploaded dataset")
    return " and ".join(needed) or None


def _remove_if_unchanged(settings: Settings, store: JobStore, job: Job) -> bool:
    """Remove ``job``'s bulky folders if it is still as listed (a resume of it waits for the removal); a failed
    job records what a resume would have needed of them."""
    folders = [settings.jobs_dir / job.id / name for name in BULKY]
    if not any(folder.exists() or folder.is_symlink() for folder in folders):
        return False  # removed before: no need to take the lock
    # read before the lock: while the job stays failed (checked under it) no worker touches its files
    removes = needed_to_resume(settings, job) if job.state == "failed" else None
    with store.unchanged(job, removes=removes) as still:
        return still and remove_bulky(settings, job.id)


def sweep_prepared_models(settings: Settings, store: JobStore) -> list[str]:
    """Remove the prepared registrations (``prepared_model_folder``) of jobs that no longer run in the attempt
    that prepared them (a worker killed before it published or discarded one); returns the folders' names."""
    swept = []
    for folder in ModelRegistry(settings.models_dir).staging_folders():
        match = _PREPARED_RE.match(folder.name)
        if match is None:
            continue
        try:
            job = store.get(match["job_id"])
        except NotFoundError:
            job = None
        if job is not None and job.state == "running" and job.attempts == int(match["attempt"]):
            continue  # its worker may still publish it
        shutil.rmtree(folder, ignore_errors=True)
        swept.append(folder.name)
    if swept:
        log.info("removed %d model registration(s) prepared by workers that stopped: %s", len(swept),
                 ", ".join(swept))
    return swept


def prune_job_files(settings: Settings, store: JobStore) -> list[str]:
    """Apply the retention rule to every ended job (and sweep the prepared registrations that no worker will
    publish: ``sweep_prepared_models``); returns the ids whose files were removed."""
    sweep_prepared_models(settings, store)
    # the last to fail first: a job submitted long ago that fails now (after a resume) keeps its checkpoints
    failed = sorted(store.list(state="failed", limit=100_000), key=lambda job: job.finished_at or 0.0, reverse=True)
    ended = [*store.list(state="succeeded", limit=100_000), *store.list(state="cancelled", limit=100_000),
             *failed[settings.keep_failed_runs:]]
    pruned = [job.id for job in ended if _remove_if_unchanged(settings, store, job)]
    if pruned:
        log.info("removed the run files of %d ended job(s)", len(pruned))
    return pruned
