"""The worker supervisor: a dead worker fails its job (never the API) and is replaced, with backoff if it keeps dying."""

from __future__ import annotations

import sys
import time

from service.jobs import supervisor as sup
from service.jobs.store import JobStore
from tests.helpers.service import make_settings, wait_for


def test_dead_worker_fails_its_job_and_is_replaced_with_backoff(home, monkeypatch):
    monkeypatch.setattr(sup, "worker_command", lambda settings: [sys.executable, "-c", "import sys; sys.exit(3)"])
    settings = make_settings(home, job_workers=1)
    store = JobStore(settings.db_path)
    job = store.create({"request": {}})
    s = sup.WorkerSupervisor(settings, store)
    s.start()
    pid = s.procs[0].pid
    store.claim_next(worker_pid=pid)  # as if that worker had taken the job
    wait_for(lambda: s.procs[0].poll() is not None, 10, what="worker exit")
    s.check()
    failed = store.get(job.id)
    assert failed.state == "failed" and "exited with code 3" in failed.error and "resume" in failed.error
    assert s.restarts == 0  # it died at once: the restart waits (2 s, then 4, 8, ... up to 60)
    time.sleep(2.1)
    s.check()
    assert s.restarts == 1 and s.procs[0].pid != pid
    s.stop(timeout=5)
    assert s.alive() == 0


def test_stop_interrupts_the_running_job_of_a_worker_that_ignores_sigterm(home, monkeypatch):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    monkeypatch.setattr(sup, "worker_command", lambda settings: [sys.executable, "-c", code])
    settings = make_settings(home, job_workers=1)
    store = JobStore(settings.db_path)
    job = store.create({"request": {}})
    s = sup.WorkerSupervisor(settings, store)
    s.start()
    store.claim_next(worker_pid=s.procs[0].pid)
    time.sleep(0.3)
    s.stop(timeout=1)
    assert s.alive() == 0 and store.get(job.id).state == "interrupted"


def test_a_failing_worker_check_is_logged_and_retried_not_the_end_of_the_watch(caplog):
    import asyncio

    from service.main import _watch_workers

    class Flaky:
        calls = 0

        def check(self) -> None:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("database is locked")

    async def main(flaky: Flaky) -> None:
        task = asyncio.create_task(_watch_workers(flaky, interval=0.01))  # type: ignore[arg-type]
        while flaky.calls < 3 and not task.done():
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    flaky = Flaky()
    asyncio.run(main(flaky))
    assert flaky.calls >= 3  # the first check's error did not end the watch: dead workers are still replaced
    assert "checking the job workers failed" in caplog.text
