"""Each attempt at a job trains in a folder of its own: ``<home>/jobs/<id>/attempts/<n>``.

``<home>/jobs/<id>/run`` is a symlink to the folder of the job's latest attempt (what the
API reads: metrics, checkpoints). A resumed attempt starts by copying the previous
attempt's folder into its own - the checkpoint ``last`` points at as hard links (a
checkpoint's files are never written in place), everything else as copies - and
continues from there; the previous folder is then removed.

A worker whose job was taken from it (marked interrupted, then resumed by another
worker) may still write to its own attempt's folder until it sees that at its next step
(a checkpoint, its outputs); it never writes into the folder the new attempt trains in.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from models.errors import CheckpointError
from service.core.config import Settings
from service.jobs.spec import job_dir, job_run_dir
from service.jobs.store import Job

ATTEMPTS = "attempts"
#: how often a copy of the previous attempt is tried again when its worker replaced the checkpoint meanwhile
_COPY_TRIES = 3


def attempt_dir(settings: Settings, job_id: str, attempt: int) -> Path:
    """The run folder of attempt ``attempt`` (``Job.attempts`` of the worker that runs it) at job ``job_id``."""
    return job_dir(settings, job_id) / ATTEMPTS / str(attempt)


def start_attempt(settings: Settings, job: Job) -> tuple[Path, bool]:
    """Make this attempt's run folder and point the job's ``run`` at it; returns the folder and whether it holds a
    checkpoint to resume from (copied from the previous attempt when ``job.resume``).

    Call it only while the job runs in this worker (just claimed): nobody else changes ``run`` then.
    """
    run = job_run_dir(settings, job.id)
    folder = attempt_dir(settings, job.id, job.attempts)
    previous = run.resolve() if run.exists() else None  # the last attempt's folder, or a run made before attempts
    _empty(folder)  # new (attempts are numbered by their claims) unless a start of this attempt crashed
    resumes = job.resume and previous is not None and carry_over(previous, folder)
    _point_run(run, folder)
    for other in folder.parent.iterdir():  # the previous attempt's folder (its checkpoint is linked in ours)
        if other != folder:
            shutil.rmtree(other, ignore_errors=True)
    return folder, resumes


def carry_over(previous: Path, folder: Path) -> bool:
    """Copy run folder ``previous`` into the empty ``folder``: its latest checkpoint (hard links) and its other files;
    False (nothing copied) when it has no checkpoint.

    ``previous`` may still be written by a worker that lost its job (until its next step): a copy that fails
    because that worker replaced the checkpoint meanwhile is made again.
    """
    from training.checkpoint import find_checkpoint

    for tries_left in range(_COPY_TRIES - 1, -1, -1):
        try:
            checkpoint = find_checkpoint(previous)
        except CheckpointError:
            return False
        try:
            _copy_run(previous, checkpoint, folder)
            return True
        except OSError:  # shutil.Error and FileNotFoundError: a file went away while it was copied
            _empty(folder)
            if not tries_left:
                raise
    return False


def _empty(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def _copy_run(previous: Path, checkpoint: Path, folder: Path) -> None:
    for entry in previous.iterdir():
        if entry.name == "checkpoints" or entry.name.startswith("."):
            continue
        if entry.is_dir():
            # copies, not links: the recipe appends to metrics.jsonl, and not every writer replaces whole files
            shutil.copytree(entry, folder / entry.name)
        elif entry.is_file():
            shutil.copy2(entry, folder / entry.name)
    checkpoints = folder / "checkpoints"
    checkpoints.mkdir()
    shutil.copytree(checkpoint, checkpoints / checkpoint.name, copy_function=_link_or_copy)
    os.symlink(checkpoint.name, checkpoints / "last")


def _link_or_copy(src: str, dst: str) -> str:
    """A hard link to a checkpoint file (saved whole, never changed in place); a synced copy where links fail."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        with open(dst, "rb") as fh:
            os.fsync(fh.fileno())
    return dst


def _point_run(run: Path, folder: Path) -> None:
    """Atomically make ``run`` a relative symlink to attempt folder ``folder`` (a run folder made before attempts,
    already carried over, is removed first)."""
    link_tmp = run.with_name(f".{run.name}.{os.getpid()}.tmp")
    link_tmp.unlink(missing_ok=True)
    os.symlink(Path(ATTEMPTS) / folder.name, link_tmp)
    if run.is_dir() and not run.is_symlink():
        shutil.rmtree(run)
    os.replace(link_tmp, run)
