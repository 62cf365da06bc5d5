"""Second review of ``service/jobs``: a restart that took jobs from workers still running them, a resume that
passed the job limit and disk quota, retention racing a resume, per-job loggers kept for the process's life,
and batching chosen by guessing at attributes."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from models.errors import DataError
from service.core.errors import InsufficientStorageError, TooManyRequestsError
from service.jobs import runner
from service.jobs.retention import prune_job_files
from service.jobs.store import JobStore
from service.jobs.submit import resume_job
from tests.helpers.service import AUTH, make_client, make_settings, wait_for


@pytest.fixture
def sleeper():
    """A real process that lives until the test ends it (a job worker still at work)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait(10)


def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    return proc.pid


# ---------------------------------------------------------------- 1. startup and a worker that still runs
def test_startup_interrupts_only_the_jobs_whose_worker_is_gone(home, sleeper):
    store = JobStore(make_settings(home).db_path)
    live, dead = store.create({"request": {}}), store.create({"request": {}})
    store.claim_next(worker_pid=sleeper.pid)
    store.claim_next(worker_pid=_gone_pid())
    interrupted, left = store.mark_abandoned(reason="the service restarted while it was running")
    assert (interrupted, left) == ([dead.id], [live.id])
    assert store.get(live.id).state == "running" and store.get(dead.id).state == "interrupted"

    sleeper.kill()
    sleeper.wait(10)
    assert store.mark_abandoned(reason="its worker process went away", job_ids=[live.id]) == ([live.id], [])
    assert store.get(live.id).state == "interrupted"


def test_a_reused_pid_is_not_the_worker(home):
    """The pid of the worker that claimed the job now belongs to another process (it started later)."""
    store = JobStore(make_settings(home).db_path)
    job = store.create({"request": {}})
    claimed = store.claim_next(worker_pid=os.getpid())
    assert claimed.worker_started is not None
    with sqlite3.connect(store.path) as conn:  # the worker that claimed it started long before this process
        conn.execute("UPDATE jobs SET worker_started = worker_started - 3600 WHERE id = ?", (job.id,))
    assert store.mark_abandoned(reason="restart") == ([job.id], [])


def test_a_database_from_before_the_start_time_column_opens_and_is_migrated(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, spec TEXT NOT NULL,"
                     " created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL,"
                     " step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER, progress REAL NOT NULL DEFAULT 0,"
                     " metrics TEXT NOT NULL DEFAULT '{}', memory TEXT, error TEXT, model_id TEXT,"
                     " cancel_requested INTEGER NOT NULL DEFAULT 0, resume INTEGER NOT NULL DEFAULT 0,"
                     " attempts INTEGER NOT NULL DEFAULT 0, worker_pid INTEGER)")
        conn.execute("INSERT INTO jobs (id, state, spec, created_at, updated_at, worker_pid)"
                     " VALUES ('old', 'running', '{}', 0, 0, ?)", (os.getpid(),))
    store = JobStore(db)
    assert store.get("old").worker_started is None
    assert store.mark_abandoned(reason="restart") == ([], ["old"])  # no start time: the live pid decides


def test_the_api_leaves_a_live_workers_job_running_and_interrupts_it_once_that_worker_is_gone(home, sleeper):
    """End to end: the lifespan adopts the orphan's job and the worker watch marks it when the orphan dies."""
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job = store.create({"request": {}})
    store.claim_next(worker_pid=sleeper.pid)  # a worker left running by an earlier API process
    with make_client(home) as client:
        assert client.get(f"/v1/jobs/{job.id}", headers=AUTH).json()["state"] == "running"
        sleeper.kill()
        sleeper.wait(10)
        wait_for(lambda: store.get(job.id).state == "interrupted", 10, what="the adopted job interrupted")
    assert "resume" in (store.get(job.id).error or "")


def test_a_worker_cannot_record_the_end_of_a_job_taken_from_it(home):
    store = JobStore(make_settings(home).db_path)
    job = store.create({"request": {}})
    first = store.claim_next(worker_pid=111)
    store.mark_interrupted(worker_pid=111)
    store.requeue_for_resume(job.id)
    store.claim_next(worker_pid=222)
    assert store.finish(job.id, "failed", error="late", worker_pid=first.worker_pid) is False
    now = store.get(job.id)
    assert now.state == "running" and now.worker_pid == 222 and now.error is None
    assert store.finish(job.id, "succeeded", model_id="m", worker_pid=222) is True
    assert store.get(job.id).state == "succeeded"


def test_the_runner_returns_the_state_of_a_job_taken_from_its_worker(home, monkeypatch):
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job = store.create({"request": {}, "data_yaml": "d.yaml", "uploaded_dataset": True, "model_id": "m"})
    stale = store.claim_next(worker_pid=111)

    def taken_then_failing(job, settings, store, worker_stop, log):
        store.mark_interrupted(worker_pid=111)  # e.g. an old API start marked it while this worker ran it
        store.requeue_for_resume(job.id)
        store.claim_next(worker_pid=222)
        return runner._finish(store, job, "failed", log, error="DataError: late")

    monkeypatch.setattr(runner, "_run", taken_then_failing)
    assert runner.run_job(stale, settings, store, lambda: False) == "running"
    assert store.get(job.id).worker_pid == 222
    assert "not recorded" in runner.job_log_path(settings, job.id).read_text()


# ---------------------------------------------------------------- 2. a resume counts like a submission
def _failed(store: JobStore, owner: str, dataset_bytes: int = 0) -> str:
    job = store.create({"request": {}, "owner": owner, "dataset_bytes": dataset_bytes})
    store.claim_next(worker_pid=1)
    store.finish(job.id, "failed", error="boom")
    return job.id


def test_resuming_a_failed_job_counts_against_the_keys_job_limit(home):
    settings = make_settings(home, max_active_jobs_per_key=1)
    store = JobStore(settings.db_path)
    failed = _failed(store, "key-a")
    store.create({"request": {}, "owner": "key-a"})  # the key's one place is taken
    with pytest.raises(TooManyRequestsError, match="limit 1"):
        resume_job(failed, settings=settings, store=store)
    assert store.get(failed).state == "failed" and store.active_for("key-a") == 1


def test_resuming_a_failed_job_counts_against_the_disk_quota(home):
    settings = make_settings(home, max_active_dataset_bytes=1000)
    store = JobStore(settings.db_path)
    failed = _failed(store, "key-a", dataset_bytes=800)
    store.create({"request": {}, "owner": "key-b", "dataset_bytes": 500})
    with pytest.raises(InsufficientStorageError, match="quota"):
        resume_job(failed, settings=settings, store=store)
    assert store.get(failed).state == "failed" and store.active_dataset_bytes() == 500


def test_resuming_an_interrupted_job_keeps_its_place(home):
    """An interrupted job is active already: a key at its limit may still resume it."""
    settings = make_settings(home, max_active_jobs_per_key=1, max_active_dataset_bytes=1000)
    store = JobStore(settings.db_path)
    job = store.create({"request": {}, "owner": "key-a", "dataset_bytes": 900})
    store.claim_next(worker_pid=1)
    store.mark_interrupted(worker_pid=1)
    assert resume_job(job.id, settings=settings, store=store).state == "queued"


# ---------------------------------------------------------------- 3. retention and a resume at the same moment
def test_retention_leaves_the_run_of_a_failed_job_resumed_after_it_was_listed(home, monkeypatch):
    settings = make_settings(home, keep_failed_runs=0)
    store = JobStore(settings.db_path)
    failed = _failed(store, "key-a")
    (settings.jobs_dir / failed / "run" / "checkpoints").mkdir(parents=True)
    listed = store.list

    def list_then_resume(state=None, limit=100, offset=0):
        jobs = listed(state=state, limit=limit, offset=offset)
        if state == "failed":
            store.requeue_for_resume(failed)  # POST /resume lands between the listing and the removal
        return jobs

    monkeypatch.setattr(store, "list", list_then_resume)
    assert prune_job_files(settings, store) == []
    assert (settings.jobs_dir / failed / "run" / "checkpoints").is_dir()


def test_a_resume_waits_for_a_removal_in_progress(home, monkeypatch):
    """Removal holds the store's write lock: the resume is ordered after it, never in the middle."""
    from service.jobs import retention

    settings = make_settings(home, keep_failed_runs=0)
    store = JobStore(settings.db_path)
    failed = _failed(store, "key-a")
    (settings.jobs_dir / failed / "run").mkdir(parents=True)
    removing = threading.Event()
    real_remove = retention.remove_bulky

    def slow_remove(settings, job_id):
        removing.set()
        time.sleep(0.3)  # the resume below arrives now
        return real_remove(settings, job_id)

    monkeypatch.setattr(retention, "remove_bulky", slow_remove)
    pruner = threading.Thread(target=prune_job_files, args=(settings, store))
    pruner.start()
    assert removing.wait(10)
    assert store.requeue_for_resume(failed).state == "queued"  # waited for the lock ...
    assert not (settings.jobs_dir / failed / "run").exists()  # ... so the removal was over (the resume starts over)
    pruner.join(10)


# ---------------------------------------------------------------- 4. per-job logging is released
def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_job_logging_leaves_no_logger_handler_or_open_file_behind(home, monkeypatch):
    settings = make_settings(home)
    store = JobStore(settings.db_path)

    def fake_run(job, settings, store, worker_stop, log):
        log.info("line of %s", job.id)
        raise_in = job.spec["request"].get("raise")
        if raise_in:
            raise DataError("bad data")
        store.finish(job.id, "failed", error="done")
        return "failed"

    monkeypatch.setattr(runner, "_run", fake_run)
    loggers_before = set(logging.Logger.manager.loggerDict)
    handlers_before = list(runner.job_log.handlers)
    fds_before = None
    ids = []
    for i in range(12):
        job = store.create({"request": {"raise": i % 3 == 0}})
        claimed = store.claim_next(worker_pid=1)
        try:
            runner.run_job(claimed, settings, store, lambda: False)
        except DataError:
            pass
        ids.append(job.id)
        if i == 1:
            fds_before = _fd_count()  # after the first jobs: lazily opened files (the database) are open by now
    new_loggers = set(logging.Logger.manager.loggerDict) - loggers_before
    assert not [name for name in new_loggers if name.startswith("glasses_vision.job")]
    assert runner.job_log.handlers == handlers_before
    assert _fd_count() <= (fds_before or 0)
    for job_id in ids:
        assert runner.job_log_path(settings, job_id).read_text().count("line of ") == 1


def test_two_jobs_at_once_write_only_their_own_lines(home):
    settings = make_settings(home)
    both = threading.Barrier(2, timeout=10)

    def job(job_id: str) -> None:
        with runner.job_logging(settings, job_id) as log:
            both.wait()
            log.info("line of %s", job_id)
            both.wait()

    threads = [threading.Thread(target=job, args=(name,)) for name in ("job-a", "job-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for name, other in (("job-a", "job-b"), ("job-b", "job-a")):
        text = runner.job_log_path(settings, name).read_text()
        assert f"line of {name}" in text and other not in text


# ---------------------------------------------------------------- 5. batching reads the runtime's real type
def test_only_a_runtime_detector_is_batched_not_a_look_alike():
    from service.core.inference import batchable

    class LookAlike:
        imgsz, names, batch_size = (32, 32), ["a"], None

        def raw(self, batch):
            return batch

        def detect(self, image, conf=0.25, iou=0.45, max_det=300):
            return []

    assert not batchable(LookAlike())
