"""Fifth review of ``service/jobs``: the model was registered (its file read and hashed) while the store's write lock
was held, and a worker's writes were checked by its pid only - a later claim of the same job by the same process
(or by a process given the same pid) could be written over by the earlier one."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager

import pytest

from service.jobs import runner
from service.jobs.store import JobStore
from service.registry import ModelRegistry
from tests.helpers.service import claimed_upload_job, make_settings
from tests.test_jobs_review3 import fake_training  # noqa: F401 - the recipe and export stand-ins (a fixture)

PID = 111


def _claimed_again_by_the_same_pid(store: JobStore, job_id: str) -> None:
    """The job is taken from its worker and claimed again by a worker with the same pid (attempt 2)."""
    store.mark_interrupted(worker_pid=PID)
    store.requeue_for_resume(job_id)
    assert store.claim_next(worker_pid=PID).attempts == 2
    store.update_progress(job_id, step=7, total_steps=100, metrics={"loss": 1.0})


def _hidden_entries(settings) -> list[str]:
    return sorted(p.name for p in settings.models_dir.iterdir() if p.name.startswith("."))


def _while_hashing(monkeypatch, meanwhile) -> None:
    """Run ``meanwhile()`` each time the registry hashes a model file (the slow step of a registration)."""
    import service.registry

    real_hash = service.registry.file_sha256

    def hash_and(path):
        meanwhile()
        return real_hash(path)

    monkeypatch.setattr(service.registry, "file_sha256", hash_and)


# ---------------------------------------------------------------- 1. no write lock while the model is hashed
def test_the_store_takes_writes_while_the_model_file_is_hashed(home, fake_training, monkeypatch):  # noqa: F811
    from service.registry import file_sha256

    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job, claimed = claimed_upload_job(store, PID, "m-review5")
    writes = []

    def write_meanwhile():
        conn = sqlite3.connect(settings.db_path, timeout=0.2, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # fails ("database is locked") if the worker holds the write lock
            conn.execute("UPDATE jobs SET updated_at = updated_at WHERE id = ?", (job.id,))
            conn.execute("COMMIT")
            writes.append("written")
        except sqlite3.OperationalError as exc:
            writes.append(str(exc))
        finally:
            conn.close()

    _while_hashing(monkeypatch, write_meanwhile)
    assert runner.run_job(claimed, settings, store, lambda: False) == "succeeded"
    assert writes == ["written"]
    record = ModelRegistry(settings.models_dir).get("m-review5")
    assert record.job_id == job.id and record.sha256 == file_sha256(record.path)
    assert _hidden_entries(settings) == []  # the prepared folder was renamed into place


def test_a_job_taken_while_its_model_is_prepared_leaves_no_model_and_no_prepared_files(
        home, fake_training, monkeypatch):  # noqa: F811
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job, claimed = claimed_upload_job(store, PID, "m-review5")
    _while_hashing(monkeypatch, lambda: _claimed_again_by_the_same_pid(store, job.id))
    assert runner.run_job(claimed, settings, store, lambda: False) == "running"
    assert not ModelRegistry(settings.models_dir).exists("m-review5")
    assert _hidden_entries(settings) == []
    now = store.get(job.id)
    assert (now.state, now.model_id, now.attempts, now.step) == ("running", None, 2, 7)


def test_a_model_id_taken_while_the_model_was_prepared_fails_the_job_and_keeps_the_other_model(
        home, fake_training, monkeypatch):  # noqa: F811
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job, claimed = claimed_upload_job(store, PID, "m-review5")
    other = settings.models_dir / "m-review5"

    def registered_meanwhile():
        other.mkdir()
        (other / "model.json").write_text("{}")

    _while_hashing(monkeypatch, registered_meanwhile)
    assert runner.run_job(claimed, settings, store, lambda: False) == "failed"
    now = store.get(job.id)
    assert now.model_id is None and "already registered" in now.error
    assert sorted(p.name for p in other.iterdir()) == ["model.json"] and _hidden_entries(settings) == []


def test_a_success_that_is_not_recorded_withdraws_the_published_model(home, fake_training, monkeypatch):  # noqa: F811
    """The publication and the job's success are one: a transaction that fails after the rename takes the model back."""
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job, claimed = claimed_upload_job(store, PID, "m-review5")
    real_finishing = JobStore.finishing

    @contextmanager
    def success_that_fails_to_commit(self, job_id, state, **kwargs):
        with real_finishing(self, job_id, state, **kwargs) as moved:
            yield moved
            if state == "succeeded":
                raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(JobStore, "finishing", success_that_fails_to_commit)
    assert runner.run_job(claimed, settings, store, lambda: False) == "failed"
    assert not ModelRegistry(settings.models_dir).exists("m-review5") and _hidden_entries(settings) == []
    assert store.get(job.id).model_id is None


# ---------------------------------------------------------------- 2. the claim, not only the pid
def test_an_earlier_claim_by_the_same_pid_cannot_write_for_the_later_one(home):
    store = JobStore(make_settings(home).db_path)
    job = store.create({"request": {}})
    first = store.claim_next(worker_pid=PID)
    _claimed_again_by_the_same_pid(store, job.id)
    assert store.runs_in(job.id, PID, attempt=2) and not store.runs_in(job.id, PID, attempt=first.attempts)
    assert store.update_progress(job.id, step=90, metrics={"loss": 9.0}, worker_pid=PID, attempt=1) is False
    assert store.mark_interrupted(PID, "stale", attempt=1) == []
    assert store.finish(job.id, "failed", error="stale", worker_pid=PID, attempt=1) is False
    with store.finishing(job.id, "succeeded", model_id="m", worker_pid=PID, attempt=1) as its_own:
        assert not its_own
    now = store.get(job.id)
    assert (now.state, now.step, now.metrics, now.error, now.model_id) == ("running", 7, {"loss": 1.0}, None, None)
    assert store.update_progress(job.id, step=8, worker_pid=PID, attempt=2) is True
    assert store.finish(job.id, "succeeded", model_id="m", worker_pid=PID, attempt=2) is True
    with pytest.raises(ValueError, match="worker_pid"):
        store.update_progress(job.id, step=9, attempt=2)


def test_a_job_claimed_again_by_the_same_pid_stops_the_earlier_run_and_keeps_its_progress(
        home, fake_training):  # noqa: F811
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job, claimed = claimed_upload_job(store, PID, "m-review5")
    fake_training.taken_at, fake_training.take = 2, lambda: _claimed_again_by_the_same_pid(store, job.id)
    assert runner.run_job(claimed, settings, store, lambda: False) == "running"
    assert fake_training.stop_seen  # pid alone would have let the first attempt run on and write
    now = store.get(job.id)
    assert (now.state, now.worker_pid, now.attempts, now.step, now.metrics) == ("running", PID, 2, 7, {"loss": 1.0})
    assert not ModelRegistry(settings.models_dir).exists("m-review5")
    assert "as attempt 1" in runner.job_log_path(settings, job.id).read_text()
