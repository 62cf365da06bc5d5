"""Starts and watches the job worker processes from the API process.

Training runs in these child processes, never in the API process: if one dies
(a crash, the OOM killer), the API keeps serving, the job it was running is
marked failed with the exit code and a hint to resume, and a fresh worker takes
its place. On shutdown the workers get SIGTERM, stop at the next training step
(their job becomes ``interrupted``, resumable), and are killed if they linger.

Jobs that a still-running worker of an earlier API process (or one started by
hand) runs when the API starts are left to that worker and watched here
(``adopt``): the job becomes ``interrupted`` once that worker is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from service.core.config import Settings
from service.jobs.store import JobStore

log = logging.getLogger("glasses_vision.service")
REPO_ROOT = Path(__file__).resolve().parents[2]


def worker_command(settings: Settings) -> list[str]:
    # Keys stay out of argv (visible in ps); workers never need them.
    payload = settings.model_dump_json(exclude={"api_keys"})
    return [sys.executable, "-m", "service.jobs.worker", "--settings-json", payload]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("YOLO_OFFLINE", "1")
    env.setdefault("YOLO_VERBOSE", "False")
    return env


class WorkerSupervisor:
    """Keeps ``settings.job_workers`` worker processes alive."""

    def __init__(self, settings: Settings, store: JobStore):
        self.settings, self.store = settings, store
        self.procs: list[subprocess.Popen | None] = [None] * settings.job_workers
        self.restarts = 0
        self._log_dir = settings.home / "logs"
        self._started_at = [0.0] * settings.job_workers
        self._fast_failures = [0] * settings.job_workers
        self._respawn_after = [0.0] * settings.job_workers
        #: running jobs of workers this supervisor did not start (see ``adopt``)
        self.adopted: set[str] = set()

    def _spawn(self, slot: int) -> subprocess.Popen:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        with open(self._log_dir / f"worker-{slot}.log", "ab") as logf:
            proc = subprocess.Popen(
                worker_command(self.settings), stdout=logf, stderr=subprocess.STDOUT, env=worker_env(), cwd=REPO_ROOT
            )
        log.info("started job worker %d (pid %d)", slot, proc.pid)
        self._started_at[slot] = time.monotonic()
        return proc

    def start(self) -> None:
        for slot in range(len(self.procs)):
            self.procs[slot] = self._spawn(slot)

    def adopt(self, job_ids: list[str]) -> None:
        """Watch running jobs whose worker this supervisor did not start: each becomes interrupted (resumable)
        once its worker is gone without recording an end."""
        self.adopted.update(job_ids)

    def alive(self) -> int:
        return sum(1 for p in self.procs if p is not None and p.poll() is None)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

    def check(self) -> None:
        """Replace dead workers; their running job is marked failed (resumable), or cancelled if that was asked.
        Adopted jobs whose worker is gone are marked interrupted."""
        if self.adopted:
            gone, live = self.store.mark_abandoned("its worker process went away", job_ids=sorted(self.adopted))
            for job_id in gone:
                log.warning("job %s interrupted: the worker that ran it (not started by this service) is gone", job_id)
            self.adopted = set(live)
        for slot, proc in enumerate(self.procs):
            if proc is None or proc.poll() is None:
                continue
            code = proc.returncode
            for job in self.store.list(state="running", limit=1000):
                if job.worker_pid != proc.pid:
                    continue
                if job.cancel_requested:  # it died before it saw the request: the job ends as asked
                    self.store.finish(job.id, "cancelled", error="cancelled on request", worker_pid=proc.pid,
                                      attempt=job.attempts)
                    continue
                self.store.finish(job.id, "failed", worker_pid=proc.pid, attempt=job.attempts, error=(
                    f"the worker process exited with code {code} (a crash, or killed for memory) while running this "
                    "job; resume the job to continue from its last checkpoint"))
                log.warning("job %s failed: worker %d exited with code %s", job.id, proc.pid, code)
            now = time.monotonic()
            if self._respawn_after[slot] == 0.0:
                # a worker that keeps dying right after it starts (a broken install) is restarted with backoff
                quick = now - self._started_at[slot] < 5.0
                self._fast_failures[slot] = self._fast_failures[slot] + 1 if quick else 0
                delay = min(60.0, 2.0 ** self._fast_failures[slot]) if quick else 0.0
                self._respawn_after[slot] = now + delay
                if delay:
                    log.error("job worker %d died %.1fs after start (code %s); restarting in %.0fs; see %s",
                              slot, now - self._started_at[slot], code, delay, self._log_dir / f"worker-{slot}.log")
            if now < self._respawn_after[slot]:
                continue
            self._respawn_after[slot] = 0.0
            self.restarts += 1
            self.procs[slot] = self._spawn(slot)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every worker, wait for them to park their jobs, then SIGKILL what is left."""
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for proc in live:
            self.store.mark_interrupted(worker_pid=proc.pid, reason="the service stopped while it was running")
        self.procs = [None] * len(self.procs)
