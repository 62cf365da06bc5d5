"""Is a job's worker process still there?

A job row names its worker by pid and by that process's start time: a pid alone may
belong to another process by now (pids are reused), so a live pid whose process
started at another time is not the worker. Workers share the database's host (SQLite
in WAL mode needs one), so the pid is a local one.
"""

from __future__ import annotations

import psutil  # type: ignore[import-untyped]  # no stubs installed; a dependency of ultralytics too

#: how far two readings of one process's start time may differ (the boot time they are counted from can move
#: by a second when the wall clock is set); a reused pid belongs to a process started well after the worker.
START_TIME_TOLERANCE_S = 1.0


def process_started(pid: int) -> float | None:
    """The start time (epoch seconds) of process ``pid``; None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def process_alive(pid: int | None, started: float | None) -> bool:
    """Whether process ``pid`` runs and, when ``started`` is known, is the one that started then.

    A zombie is gone (it only waits for its parent to read its exit code); a process this user may not
    inspect is not one of our workers (they run as this user).
    """
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except psutil.Error:  # NoSuchProcess (ZombieProcess included) or AccessDenied
        return False
    return started is None or abs(created - started) <= START_TIME_TOLERANCE_S
