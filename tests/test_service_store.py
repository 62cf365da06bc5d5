"""The SQLite job store: WAL mode, queue order, atomic claims across processes, restart semantics."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from models.errors import NotFoundError
from service.jobs.store import JobStore


def _claim_all(db_path, out):
    store = JobStore(db_path)
    got = []
    while (job := store.claim_next(worker_pid=mp.current_process().pid)) is not None:
        got.append(job.id)
    out.put(got)


def test_store_is_wal_and_persists(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.create({"request": {"steps": 3}})
    conn = sqlite3.connect(tmp_path / "jobs.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    again = JobStore(tmp_path / "jobs.sqlite3").get(job.id)
    assert again.state == "queued" and again.spec == {"request": {"steps": 3}}


def test_claim_in_fifo_order_and_progress(tmp_path):
    store = JobStore(tmp_path / "db")
    ids = [store.create({"n": i}).id for i in range(3)]
    first = store.claim_next(worker_pid=123)
    assert first.id == ids[0] and first.state == "running" and first.attempts == 1 and first.worker_pid == 123
    store.update_progress(first.id, step=5, total_steps=10, metrics={"loss": 2.0}, memory={"total_bytes": 7})
    store.update_progress(first.id, step=6, metrics={"map50": 0.5})
    job = store.get(first.id)
    assert job.step == 6 and job.progress == pytest.approx(0.6)
    assert job.metrics == {"loss": 2.0, "map50": 0.5} and job.memory == {"total_bytes": 7}
    store.finish(first.id, "succeeded", model_id="m1")
    job = store.get(first.id)
    assert job.state == "succeeded" and job.progress == 1.0 and job.model_id == "m1" and job.worker_pid is None
    assert store.counts()["queued"] == 2 and store.counts()["succeeded"] == 1


def test_two_processes_never_claim_the_same_job(tmp_path):
    db = tmp_path / "db"
    store = JobStore(db)
    ids = {store.create({"n": i}).id for i in range(30)}
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(db, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    claimed = results[0] + results[1]
    assert sorted(claimed) == sorted(ids) and len(set(claimed)) == len(claimed)


def test_restart_marks_running_interrupted_and_resume_requeues(tmp_path):
    store = JobStore(tmp_path / "db")
    a, b = store.create({"n": 1}), store.create({"n": 2})
    store.claim_next(worker_pid=99)
    assert store.mark_interrupted(reason="restart") == [a.id]
    job = store.get(a.id)
    assert job.state == "interrupted" and "resume" in job.error
    assert store.get(b.id).state == "queued"
    # only interrupted / failed jobs can be resumed; others come back unchanged
    assert store.requeue_for_resume(b.id).resume is False
    job = store.requeue_for_resume(a.id)
    assert job.state == "queued" and job.resume is True and job.error is None


def test_cancel_queued_is_immediate_running_is_requested(tmp_path):
    store = JobStore(tmp_path / "db")
    a, b = store.create({}), store.create({})
    store.claim_next(worker_pid=1)
    assert store.request_cancel(b.id).state == "cancelled"
    running = store.request_cancel(a.id)
    assert running.state == "running" and running.cancel_requested and store.cancel_requested(a.id)
    with pytest.raises(NotFoundError, match="no job"):
        store.request_cancel("job-missing")
    with pytest.raises(NotFoundError):
        store.get("nope")
