"""Review 6: the worker's stop check reads its job once per poll (one database connection, not one per question)."""

from __future__ import annotations

from service.jobs.runner import StopCheck
from service.jobs.store import JobStore
from tests.helpers.service import make_settings


def test_a_stop_check_poll_reads_the_job_once_and_sees_a_cancel_and_a_lost_claim(home, monkeypatch):
    store = JobStore(make_settings(home).db_path)
    store.create({"request": {}})
    job = store.claim_next(worker_pid=7)
    opened = []
    connect = store._connect
    monkeypatch.setattr(store, "_connect", lambda: opened.append(1) or connect())
    assert StopCheck(store, job, lambda: False)() is False
    assert len(opened) == 1
    store.mark_interrupted(worker_pid=7)
    store.requeue_for_resume(job.id)
    again = store.claim_next(worker_pid=7)  # the same pid, a later claim: another owner
    taken = StopCheck(store, job, lambda: False)
    assert taken() and taken.taken and not taken.cancelled
    store.request_cancel(again.id)
    cancelled = StopCheck(store, again, lambda: False)
    assert cancelled() and cancelled.cancelled and not cancelled.taken
