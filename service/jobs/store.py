"""The job store: one SQLite database (WAL mode) under the service home.

The API process and the worker processes share it. Every call opens its own
short-lived connection, so the store is safe to use from any thread or process;
claiming the next queued job is one ``BEGIN IMMEDIATE`` transaction, so two
workers never take the same job.

States: ``queued`` → ``running`` → ``succeeded`` | ``failed`` | ``cancelled`` |
``interrupted`` (the process running it went away; ``resume`` queues it again
and the recipe continues from its last checkpoint).

A running job names its worker by pid and by that process's start time
(``service.jobs.processes``), and its claim by ``attempts`` (each claim counts one
more): every write a worker makes to its job (progress, its end, the model it
registers: ``worker_pid=`` and ``attempt=``) is made only while the job is still
running in that worker under that claim - a later claim of the job by the same
process, or by a process given the same pid, is another owner - and the API process
marks a running job interrupted only once its worker is really gone.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, List

from models.errors import NotFoundError
from service.core.errors import ConflictError, InsufficientStorageError, TooManyRequestsError
from service.jobs.processes import process_alive, process_started

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
#: states a job never leaves by itself (``failed`` can still be resumed on request).
FINAL_STATES = ("succeeded", "failed", "cancelled")
#: the largest row offset SQLite takes (a signed 64-bit INTEGER)
MAX_OFFSET = 2**63 - 1
#: states that hold a place in the queue (and their uploaded dataset on disk).
ACTIVE_STATES = ("queued", "running", "interrupted")
#: the placeholders of ``state IN (...)`` for ``ACTIVE_STATES``
_ACTIVE_MARKS = ",".join("?" * len(ACTIVE_STATES))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    progress REAL NOT NULL DEFAULT 0,
    metrics TEXT NOT NULL DEFAULT '{}',
    memory TEXT,
    error TEXT,
    model_id TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    resume INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER,
    worker_started REAL,
    retention_removed TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_at);
CREATE TABLE IF NOT EXISTS workers (
    pid INTEGER PRIMARY KEY,
    seen_at REAL NOT NULL
);
"""
#: columns added after the first release, with their types (an older database gains them when opened)
_ADDED_COLUMNS = (("worker_started", "REAL"), ("retention_removed", "TEXT"))
#: the condition a worker's write to its job carries: the job still runs in that worker
_STILL_ITS_OWN = " AND state = 'running' AND worker_pid = ?"
#: ... and under the same claim (``attempts`` counts the claims)
_SAME_CLAIM = " AND attempts = ?"


@dataclass
class Job:
    """One row of the store."""

    id: str
    state: str
    spec: dict[str, Any]
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int | None = None
    progress: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] | None = None
    error: str | None = None
    model_id: str | None = None
    cancel_requested: bool = False
    resume: bool = False
    attempts: int = 0
    worker_pid: int | None = None
    #: the start time of the worker process (with ``worker_pid``: tells it from a later process given its pid)
    worker_started: float | None = None
    #: what retention removed that a resume needs (the run's checkpoints, the uploaded dataset); such a failed
    #: job cannot be resumed
    retention_removed: str | None = None

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> "Job":
        data = dict(row)
        data["spec"] = json.loads(data["spec"])
        data["metrics"] = json.loads(data["metrics"] or "{}")
        data["memory"] = json.loads(data["memory"]) if data["memory"] else None
        data["cancel_requested"] = bool(data["cancel_requested"])
        data["resume"] = bool(data["resume"])
        return cls(**data)


class JobStore:
    """Persistent job queue and status table."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the database (and its -wal / -shm files) readable by the owner only
        old_umask = os.umask(0o077)
        try:
            with self._connect() as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
            with self._transaction() as conn:  # a database made before these columns existed
                columns = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
                for name, kind in _ADDED_COLUMNS:
                    if name not in columns:
                        conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        finally:
            os.umask(old_umask)
        for suffix in ("", "-wal", "-shm"):
            target = Path(f"{self.path}{suffix}")
            if target.exists():
                os.chmod(target, 0o600)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA synchronous=NORMAL")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ---- reading -------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job {job_id!r}")
        return Job._from_row(row)

    def list(self, state: str | None = None, limit: int = 100, offset: int = 0) -> list[Job]:
        query, args = "SELECT * FROM jobs", []
        if state:
            query += " WHERE state = ?"
            args.append(state)
        query += " ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
        with self._connect() as conn:
            rows = conn.execute(query, (*args, limit, offset)).fetchall()
        return [Job._from_row(r) for r in rows]

    def active_for(self, owner: str) -> int:
        """Jobs of ``owner`` (a key's fingerprint) that are queued, running or interrupted."""
        with self._connect() as conn:
            return _active_for(conn, owner)

    def check_owner_room(self, owner: str, limit: int) -> None:
        """Raise ``TooManyRequestsError`` when ``owner`` already has ``limit`` active jobs (``create`` checks again)."""
        with self._connect() as conn:
            _check_owner_room(conn, owner, limit)

    def active_dataset_bytes(self) -> int:
        """Bytes of uploaded datasets that active jobs keep on disk."""
        with self._connect() as conn:
            return _active_dataset_bytes(conn)

    # ---- workers -------------------------------------------------------------------------------
    def heartbeat(self, pid: int) -> None:
        """A worker says it polls this database (readiness checks that every worker does)."""
        with self._connect() as conn:
            conn.execute("INSERT INTO workers (pid, seen_at) VALUES (?, ?) ON CONFLICT(pid) DO UPDATE SET"
                         " seen_at = excluded.seen_at", (pid, time.time()))

    def worker_seen(self, pid: int) -> float | None:
        """When worker ``pid`` last polled this database (None: never)."""
        with self._connect() as conn:
            row = conn.execute("SELECT seen_at FROM workers WHERE pid = ?", (pid,)).fetchone()
        return float(row[0]) if row else None

    def counts(self) -> dict[str, int]:
        """Number of jobs in every state (zero included)."""
        with self._connect() as conn:
            rows = conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({state: n for state, n in rows})
        return out

    # ---- writing -------------------------------------------------------------------------------
    def create(
        self,
        spec: dict[str, Any],
        job_id: str | None = None,
        *,
        max_active_per_owner: int | None = None,
        max_active_dataset_bytes: int | None = None,
    ) -> Job:
        """Queue a new job.

        A ``spec["model_id"]`` that a queued, running or interrupted job will register is refused
        (``ConflictError``): the new job would train to its end, then fail at registration. With the limits,
        the active jobs of ``spec["owner"]`` and the active uploaded bytes (with this job's
        ``spec["dataset_bytes"]``) are checked in the insert's own transaction: concurrent submissions cannot
        pass them together. Raises ``TooManyRequestsError`` / ``InsufficientStorageError``.
        """
        job_id = job_id or new_job_id()
        now = time.time()
        with self._transaction() as conn:
            if spec.get("model_id"):
                row = conn.execute(
                    f"SELECT id FROM jobs WHERE state IN ({_ACTIVE_MARKS}) AND json_extract(spec, '$.model_id') = ?"
                    " LIMIT 1",
                    (*ACTIVE_STATES, spec["model_id"]),
                ).fetchone()
                if row is not None:
                    raise ConflictError(
                        f"job {row['id']} (queued, running or interrupted) will register a model {spec['model_id']!r}; "
                        "choose another model_id"
                    )
            if max_active_per_owner is not None:
                _check_owner_room(conn, spec["owner"], max_active_per_owner)
            if max_active_dataset_bytes is not None and spec.get("dataset_bytes"):
                _check_dataset_room(conn, spec["dataset_bytes"], max_active_dataset_bytes)
            conn.execute(
                "INSERT INTO jobs (id, state, spec, created_at, updated_at) VALUES (?, 'queued', ?, ?, ?)",
                (job_id, json.dumps(spec), now, now),
            )
        return self.get(job_id)

    def claim_next(self, worker_pid: int) -> Job | None:
        """Atomically move the oldest queued job to ``running`` for this worker (its pid and start time); the
        claim's number is the returned job's ``attempts``, what the worker's writes pass as ``attempt=``."""
        now = time.time()
        started = process_started(worker_pid)
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at, id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET state = 'running', worker_pid = ?, worker_started = ?, started_at = ?,"
                " updated_at = ?, attempts = attempts + 1, error = NULL WHERE id = ?",
                (worker_pid, started, now, now, row["id"]),
            )
        return self.get(row["id"])

    def update_progress(
        self,
        job_id: str,
        step: int | None = None,
        total_steps: int | None = None,
        metrics: dict[str, Any] | None = None,
        memory: dict[str, Any] | None = None,
        *,
        worker_pid: int | None = None,
        attempt: int | None = None,
    ) -> bool:
        """Record training progress; ``metrics`` are merged into the latest ones. Returns whether it was recorded.

        With ``worker_pid`` (a worker reporting; with ``attempt``, the ``attempts`` of its claim) only a job still
        running in that worker (under that claim) is written: one taken from it meanwhile keeps the progress of
        whoever runs it now.
        """
        guard, guard_args = _its_own(worker_pid, attempt)
        where: list[Any] = [job_id, *guard_args]
        query = "SELECT step, total_steps, metrics FROM jobs WHERE id = ?" + guard
        with self._transaction() as conn:
            row = conn.execute(query, where).fetchone()
            if row is None:
                return False
            step = row["step"] if step is None else int(step)
            total = row["total_steps"] if total_steps is None else int(total_steps)
            merged = json.loads(row["metrics"] or "{}")
            merged.update(metrics or {})
            progress = min(1.0, step / total) if total else 0.0
            sets = "step = ?, total_steps = ?, progress = ?, metrics = ?, updated_at = ?"
            args: list[Any] = [step, total, progress, json.dumps(merged, default=float), time.time()]
            if memory is not None:
                sets += ", memory = ?"
                args.append(json.dumps(memory, default=str))
            conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*args, job_id))
        return True

    def finish(
        self, job_id: str, state: str, error: str | None = None, model_id: str | None = None,
        *, worker_pid: int | None = None, attempt: int | None = None,
    ) -> bool:
        """Move a job to a final (or interrupted) state; returns whether it moved.

        With ``worker_pid`` (a worker recording its result; with ``attempt``, the ``attempts`` of its claim) only
        a job still running in that worker (under that claim) moves: one that was taken from it meanwhile (marked
        interrupted, resumed, claimed again) keeps its newer state.
        """
        with self.finishing(job_id, state, error=error, model_id=model_id, worker_pid=worker_pid,
                            attempt=attempt) as moved:
            return moved

    @contextmanager
    def finishing(
        self, job_id: str, state: str, error: str | None = None, model_id: str | None = None,
        *, worker_pid: int | None = None, attempt: int | None = None,
    ) -> Iterator[bool]:
        """``finish`` as one transaction with the ``with`` body: yields whether the job moves (see ``finish``);
        it is recorded when the body ends, and not at all when the body raises.

        The body runs under the database's write lock (every other writer waits for it), so it should be quick: a
        worker prepares its model's registration before (hashing, moving the file) and in the body only publishes
        it, when the job moves. No job is taken from it between the check and the publication, and a failed
        publication leaves the job running for the worker to record it failed.
        """
        if state not in FINAL_STATES and state != "interrupted":
            raise ValueError(f"finish() takes a final state, not {state!r}")
        now = time.time()
        query = (
            "UPDATE jobs SET state = ?, error = ?, model_id = COALESCE(?, model_id), finished_at = ?,"
            " updated_at = ?, worker_pid = NULL, worker_started = NULL,"
            " progress = CASE WHEN ? = 'succeeded' THEN 1.0 ELSE progress END WHERE id = ?"
        )
        guard, guard_args = _its_own(worker_pid, attempt)
        query += guard
        args: list[Any] = [state, error, model_id, now, now, state, job_id, *guard_args]
        with self._transaction() as conn:  # the body raising rolls the update back
            yield conn.execute(query, args).rowcount > 0

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a queued or interrupted job at once; ask a running one to stop."""
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no job {job_id!r}")
            if row["state"] in ("queued", "interrupted"):
                conn.execute(
                    "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = ?, updated_at = ?"
                    " WHERE id = ?",
                    (now, now, job_id),
                )
            elif row["state"] == "running":
                conn.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (now, job_id))
        return self.get(job_id)

    def requeue_for_resume(
        self,
        job_id: str,
        *,
        max_active_per_owner: int | None = None,
        max_active_dataset_bytes: int | None = None,
    ) -> Job:
        """Queue an interrupted (or failed) job again, continuing from its last checkpoint.

        Jobs in any other state are returned unchanged (check ``state``). A failed job becomes active again,
        so with the limits it is counted as ``create`` counts a new job (its owner's active jobs, its uploaded
        bytes), in the same transaction; an interrupted job is active already and keeps its place.
        A failed job whose checkpoints or uploaded dataset retention removed is refused (``ConflictError``):
        it would start over, or fail without its data.
        Raises ``ConflictError`` / ``TooManyRequestsError`` / ``InsufficientStorageError``.
        """
        with self._transaction() as conn:
            row = conn.execute("SELECT state, spec, retention_removed FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row["state"] == "failed":
                if row["retention_removed"]:
                    raise ConflictError(
                        f"job {job_id} cannot be resumed: retention removed its {row['retention_removed']} (only the "
                        "jobs that failed last keep them, GLASSES_VISION_KEEP_FAILED_RUNS); submit the job again"
                    )
                spec = json.loads(row["spec"])
                if max_active_per_owner is not None:
                    _check_owner_room(conn, spec["owner"], max_active_per_owner)
                if max_active_dataset_bytes is not None and spec.get("dataset_bytes"):
                    _check_dataset_room(conn, spec["dataset_bytes"], max_active_dataset_bytes)
            conn.execute(
                "UPDATE jobs SET state = 'queued', resume = 1, cancel_requested = 0, error = NULL,"
                " finished_at = NULL, updated_at = ? WHERE id = ? AND state IN ('interrupted', 'failed')",
                (time.time(), job_id),
            )
        return self.get(job_id)

    @contextmanager
    def unchanged(self, job: Job, removes: str | None = None) -> Iterator[bool]:
        """Hold the database's write lock for the ``with`` body and say whether ``job`` is still in the state,
        and ended at the time, it was read with: until the body ends nobody can resume, claim or finish it.

        Retention removes an ended job's files inside this, so a job resumed just before is left alone.
        ``removes`` (what of it a resume needs the body removes) is recorded with the job when it is unchanged
        and the body ends without an error: ``requeue_for_resume`` then refuses it.
        """
        with self._transaction() as conn:
            row = conn.execute("SELECT state, finished_at FROM jobs WHERE id = ?", (job.id,)).fetchone()
            still = row is not None and row["state"] == job.state and row["finished_at"] == job.finished_at
            yield still
            if still and removes:
                conn.execute("UPDATE jobs SET retention_removed = ? WHERE id = ?", (removes, job.id))

    def mark_interrupted(
        self, worker_pid: int | None = None, reason: str = "the service stopped", *, attempt: int | None = None,
    ) -> List[str]:
        """Mark running jobs (all, those of one worker, or with ``attempt`` the one it claimed as that attempt) as
        interrupted; returns their ids.

        A job whose cancel was requested (its worker went away before it saw the request) ends ``cancelled``.
        The caller knows the worker is gone (or is that worker); ``mark_abandoned`` checks it.
        """
        guard, args = _its_own(worker_pid, attempt)
        query = "SELECT id, cancel_requested FROM jobs WHERE state = 'running'" + guard
        with self._transaction() as conn:
            return _park(conn, conn.execute(query, args).fetchall(), reason)

    def mark_abandoned(self, reason: str, job_ids: Collection[str] | None = None) -> tuple[List[str], List[str]]:
        """Mark the running jobs whose worker process is gone as interrupted (cancelled when that was asked).

        A job whose worker still runs (one left by an earlier API process, or started by hand) stays running:
        that worker records its result. ``job_ids`` limits the check to those jobs. Returns the ids marked
        interrupted and the ids left to a live worker.
        """
        query = "SELECT id, cancel_requested, worker_pid, worker_started FROM jobs WHERE state = 'running'"
        args: list[str] = []
        if job_ids is not None:
            query += f" AND id IN ({','.join('?' * len(job_ids))})"
            args.extend(job_ids)
        with self._transaction() as conn:
            rows = conn.execute(query, args).fetchall()
            alive = {r["id"]: process_alive(r["worker_pid"], r["worker_started"]) for r in rows}
            gone = [r for r in rows if not alive[r["id"]]]
            return _park(conn, gone, reason), [r["id"] for r in rows if alive[r["id"]]]

    def cancel_requested(self, job_id: str) -> bool:
        with self._connect() as conn:
            row = conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def runs_in(self, job_id: str, worker_pid: int, attempt: int | None = None) -> bool:
        """Whether the job is still running in worker ``worker_pid`` (under its claim ``attempt``): not taken from it
        meanwhile."""
        guard, args = _its_own(worker_pid, attempt)
        with self._connect() as conn:
            row = conn.execute("SELECT 1 FROM jobs WHERE id = ?" + guard, (job_id, *args)).fetchone()
        return row is not None


def _its_own(worker_pid: int | None, attempt: int | None) -> tuple[str, list[int]]:
    """The condition (and its arguments) of a write by worker ``worker_pid`` under its claim ``attempt``: the job still
    runs in that worker, as that attempt; none without ``worker_pid``."""
    if worker_pid is None:
        if attempt is not None:
            raise ValueError("attempt= names a worker's claim: pass worker_pid= with it")
        return "", []
    if attempt is None:
        return _STILL_ITS_OWN, [worker_pid]
    return _STILL_ITS_OWN + _SAME_CLAIM, [worker_pid, attempt]


def _active_for(conn: sqlite3.Connection, owner: str) -> int:
    row = conn.execute(
        f"SELECT COUNT(*) FROM jobs WHERE state IN ({_ACTIVE_MARKS}) AND json_extract(spec, '$.owner') = ?",
        (*ACTIVE_STATES, owner),
    ).fetchone()
    return int(row[0])


def _check_owner_room(conn: sqlite3.Connection, owner: str, limit: int) -> None:
    active = _active_for(conn, owner)
    if active >= limit:
        raise TooManyRequestsError(
            f"this key has {active} queued, running or interrupted jobs (limit {limit}); wait for one to end or "
            "cancel one, or raise GLASSES_VISION_MAX_ACTIVE_JOBS_PER_KEY"
        )


def _check_dataset_room(conn: sqlite3.Connection, nbytes: int, quota: int) -> None:
    used = _active_dataset_bytes(conn)
    if used + nbytes > quota:
        raise InsufficientStorageError(
            f"this dataset ({nbytes} bytes) and those of queued, running or interrupted jobs ({used} bytes) pass the "
            f"disk quota ({quota} bytes); wait for jobs to end, cancel an interrupted one, or raise "
            "GLASSES_VISION_MAX_ACTIVE_DATASET_BYTES"
        )


def _park(conn: sqlite3.Connection, rows: list[sqlite3.Row], reason: str) -> List[str]:
    """Running jobs whose worker is gone: cancelled if that was asked, else interrupted; returns the interrupted."""
    now = time.time()
    interrupted = []
    for row in rows:
        if row["cancel_requested"]:
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', worker_pid = NULL, worker_started = NULL, finished_at = ?,"
                " updated_at = ?, error = 'cancelled on request' WHERE id = ?",
                (now, now, row["id"]),
            )
        else:
            conn.execute(
                "UPDATE jobs SET state = 'interrupted', worker_pid = NULL, worker_started = NULL, updated_at = ?,"
                " error = ? WHERE id = ?",
                (now, f"interrupted: {reason}; resume the job to continue from its last checkpoint", row["id"]),
            )
            interrupted.append(row["id"])
    return interrupted


def _active_dataset_bytes(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        f"SELECT COALESCE(SUM(json_extract(spec, '$.dataset_bytes')), 0) FROM jobs WHERE state IN ({_ACTIVE_MARKS})",
        ACTIVE_STATES,
    ).fetchone()
    return int(row[0] or 0)


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex[:12]
