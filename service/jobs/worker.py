"""The job worker: a separate process that runs queued jobs one at a time.

Started by the API process (``service.jobs.supervisor``); it can also be run by
hand next to a server: ``python -m service.jobs.worker --home ~/.glasses-vision``.
It claims the oldest queued job from the SQLite store, runs it
(``service.jobs.runner.run_job``) and polls again. SIGTERM, or its parent going
away, makes it stop the current job at the next training step (the job becomes
``interrupted`` and can be resumed) and exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from service.core.config import Settings
from service.jobs.store import JobStore

log = logging.getLogger("glasses_vision.worker")


class StopFlag:
    """Set by SIGTERM or when the parent process is gone."""

    def __init__(self, parent_pid: int | None):
        self.parent_pid = parent_pid
        self.signalled = False

    def __call__(self) -> bool:
        if self.signalled:
            return True
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.signalled = True
        return self.signalled


class Heartbeat(threading.Thread):
    """Writes this worker's pid and time into the job database every ``interval`` s, also while a job runs:
    the API's readiness check fails when a live worker does not appear in *its* database."""

    def __init__(self, store: JobStore, interval: float = 2.0):
        super().__init__(name="heartbeat", daemon=True)
        self.store, self.interval = store, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.store.heartbeat(os.getpid())
            except Exception as exc:  # a locked or vanished database: readiness will say so
                log.warning("heartbeat to %s failed: %s", self.store.path, exc)
            self.stopped.wait(self.interval)


def serve_jobs(settings: Settings, stop: StopFlag, once: bool = False) -> int:
    """Run jobs until ``stop()``; with ``once`` return after the first job (or when the queue is empty)."""
    store = JobStore(settings.db_path)
    heartbeat = Heartbeat(store)
    heartbeat.start()
    try:
        return _serve(settings, store, stop, once)
    finally:
        heartbeat.stopped.set()


def _serve(settings: Settings, store: JobStore, stop: StopFlag, once: bool) -> int:
    ran = 0
    while not stop():
        job = store.claim_next(os.getpid())
        if job is None:
            if once:
                break
            time.sleep(settings.worker_poll_seconds)
            continue
        from service.jobs.runner import run_job  # torch is imported only once there is work

        run_job(job, settings, store, stop)
        ran += 1
        if once:
            break
    return ran


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.jobs.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--settings-json", help="the service Settings as JSON (what the API process passes)")
    parser.add_argument("--home", help="service home (when started by hand)")
    parser.add_argument("--once", action="store_true", help="run at most one job, then exit")
    args = parser.parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    if args.settings_json:
        settings = Settings.model_validate_json(args.settings_json)
    else:
        settings = Settings.from_env(home=args.home)
    stop = StopFlag(os.getppid() if args.settings_json else None)

    def on_term(signum, frame):
        stop.signalled = True

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C on the server's terminal reaches the whole process group; the API process stops us with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN if args.settings_json else on_term)
    log.info("worker started (home %s, job database %s)", settings.home, settings.db_path)
    serve_jobs(settings, stop, once=args.once)
    log.info("worker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
