"""What a job leaves on disk once it ends, and for how long.

A succeeded job's model is in the registry and a cancelled job cannot be resumed: their
run folder (checkpoints, merged weights), export staging, temporary files and uploaded
dataset are removed, and only ``job.log`` stays. A failed job can be resumed from its
last checkpoint, so the runs of the ``keep_failed_runs`` jobs that failed last are kept
and older ones are removed the same way. Queued, running and interrupted jobs keep
everything.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from service.core.config import Settings
from service.jobs.store import JobStore

log = logging.getLogger("glasses_vision.service")

#: folders of ``<home>/jobs/<id>/`` that retention removes (``job.log`` stays).
BULKY = ("run", "dataset", "export", "tmp")


def job_bytes(folder: Path) -> int:
    """Bytes of the regular files below ``folder`` (symlinks not followed)."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def remove_bulky(settings: Settings, job_id: str) -> bool:
    """Remove a job's run, dataset, export and temporary folders; True if anything was removed."""
    root = settings.jobs_dir / job_id
    removed = False
    for name in BULKY:
        target = root / name
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
            removed = True
    return removed


def prune_job_files(settings: Settings, store: JobStore) -> list[str]:
    """Apply the retention rule to every ended job; returns the ids whose files were removed."""
    pruned: list[str] = []
    for state in ("succeeded", "cancelled"):
        for job in store.list(state=state, limit=100_000):
            if remove_bulky(settings, job.id):
                pruned.append(job.id)
    # the last to fail first: a job submitted long ago that fails now (after a resume) keeps its checkpoints
    failed = sorted(store.list(state="failed", limit=100_000), key=lambda job: job.finished_at or 0.0, reverse=True)
    for job in failed[settings.keep_failed_runs:]:
        if remove_bulky(settings, job.id):
            pruned.append(job.id)
    if pruned:
        log.info("removed the run files of %d ended job(s)", len(pruned))
    return pruned
