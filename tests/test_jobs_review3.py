"""Third review of ``service/jobs``: a worker whose job was taken from it still wrote its progress and registered
its model, and a failed job whose checkpoints (or uploaded dataset) retention had removed could still be resumed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from service.core.errors import ConflictError
from service.jobs import runner
from service.jobs.retention import prune_job_files
from service.jobs.store import JobStore
from service.jobs.submit import resume_job
from service.registry import ModelRegistry
from tests.helpers.service import AUTH, claimed_upload_job, make_client, make_settings

STALE, CURRENT = 111, 222


def _take(store: JobStore, job_id: str) -> None:
    """The job is taken from worker STALE (e.g. a restart that thought it gone), resumed and claimed by CURRENT."""
    store.mark_interrupted(worker_pid=STALE)
    store.requeue_for_resume(job_id)
    store.claim_next(worker_pid=CURRENT)
    store.update_progress(job_id, step=7, total_steps=100, metrics={"loss": 1.0})


# ---------------------------------------------------------------- 1. progress only from the job's own worker
def test_a_worker_cannot_write_the_progress_of_a_job_taken_from_it(home):
    store = JobStore(make_settings(home).db_path)
    job = store.create({"request": {}})
    store.claim_next(worker_pid=STALE)
    assert store.update_progress(job.id, step=3, total_steps=100, worker_pid=STALE) is True
    _take(store, job.id)
    assert store.update_progress(job.id, step=90, total_steps=100, metrics={"loss": 9.0}, memory={"total_bytes": 1},
                                 worker_pid=STALE) is False
    now = store.get(job.id)
    assert (now.step, now.metrics, now.memory, now.worker_pid) == (7, {"loss": 1.0}, None, CURRENT)
    assert store.runs_in(job.id, CURRENT) and not store.runs_in(job.id, STALE)


def _tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(path))


@pytest.fixture
def fake_training(monkeypatch):
    """The recipe and the export stand-ins: ``calls`` says when the job is taken (``taken_at``: an event
    number, or "export") and what the recipe saw."""
    calls = SimpleNamespace(taken_at=None, stop_seen=False, take=None)

    def train(config, on_event, should_stop):
        for step in range(1, 4):
            if calls.taken_at == step:
                calls.take()
            on_event({"event": "log", "step": step * 10, "total_steps": 100, "loss": float(step)})
            if should_stop():
                calls.stop_seen = True
                return SimpleNamespace(status="stopped", memory={}, metrics={}, steps=step * 10, total_steps=100)
        return SimpleNamespace(status="completed", memory={}, metrics={"map50": 0.5}, steps=30, total_steps=100,
                               merged_dir=None)

    def export_for_registry(run_dir, onnx_tmp, **kwargs):
        _tiny_onnx(onnx_tmp)
        if calls.taken_at == "export":
            calls.take()
        return {"classes": ["a"], "imgsz": 64, "export": {}}

    monkeypatch.setattr("training.recipe.train", train)
    monkeypatch.setattr("service.jobs.exporting.export_for_registry", export_for_registry)
    monkeypatch.setattr(runner, "build_train_config", lambda *args, **kwargs: None)
    monkeypatch.setattr(runner, "_CANCEL_POLL_SECONDS", 0.0)  # the stop check reads the store at every step
    return calls


def test_a_job_taken_during_training_is_stopped_and_its_progress_left_alone(home, fake_training):
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job, claimed = claimed_upload_job(store, STALE, "m-review3")
    fake_training.taken_at, fake_training.take = 2, lambda: _take(store, job.id)
    assert runner.run_job(claimed, settings, store, lambda: False) == "running"
    assert fake_training.stop_seen  # the recipe was told to stop at the next step
    now = store.get(job.id)
    assert (now.step, now.metrics, now.worker_pid) == (7, {"loss": 1.0}, CURRENT)
    assert not ModelRegistry(settings.models_dir).exists("m-review3")
    assert "not recorded" in runner.job_log_path(settings, job.id).read_text()


# ---------------------------------------------------------------- 2. the model only from the job's own worker
def test_a_job_taken_during_its_export_registers_no_model(home, fake_training):
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job, claimed = claimed_upload_job(store, STALE, "m-review3")
    fake_training.taken_at, fake_training.take = "export", lambda: _take(store, job.id)
    assert runner.run_job(claimed, settings, store, lambda: False) == "running"
    assert not ModelRegistry(settings.models_dir).exists("m-review3")  # no entry that no job owns
    now = store.get(job.id)
    assert (now.state, now.model_id, now.worker_pid, now.step) == ("running", None, CURRENT, 7)


def test_a_job_still_its_own_registers_its_model_and_succeeds(home, fake_training):
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job, claimed = claimed_upload_job(store, STALE, "m-review3")
    assert runner.run_job(claimed, settings, store, lambda: False) == "succeeded"
    now = store.get(job.id)
    assert (now.state, now.model_id, now.step) == ("succeeded", "m-review3", 30)
    assert ModelRegistry(settings.models_dir).get("m-review3").job_id == job.id


def test_a_registration_that_raises_records_no_end(home):
    """``finishing``: the end and the registration are one transaction."""
    store = JobStore(make_settings(home).db_path)
    job = store.create({"request": {}})
    store.claim_next(worker_pid=STALE)
    with pytest.raises(OSError):
        with store.finishing(job.id, "succeeded", model_id="m", worker_pid=STALE) as its_own:
            assert its_own
            raise OSError("disk full")
    assert (store.get(job.id).state, store.get(job.id).model_id) == ("running", None)


# ---------------------------------------------------------------- 3. no resume once retention took what it needs
def _failed_with_files(store: JobStore, settings, checkpoint: bool, uploaded: bool) -> str:
    folder = settings.jobs_dir / "job-x"
    job = store.create({"request": {}, "owner": "key-a", "uploaded_dataset": uploaded,
                        "data_yaml": str(folder / "dataset" / "data.yaml")}, job_id="job-x")
    (folder / "run").mkdir(parents=True)
    if checkpoint:
        (folder / "run" / "checkpoints" / "last").mkdir(parents=True)
    if uploaded:
        (folder / "dataset").mkdir()
        (folder / "dataset" / "data.yaml").write_text("names: [a]\n")
    store.claim_next(worker_pid=1)
    store.finish(job.id, "failed", error="boom")
    return job.id


@pytest.mark.parametrize("checkpoint, uploaded, lost", [
    (True, False, "run's checkpoints"),
    (False, True, "uploaded dataset"),
    (True, True, "run's checkpoints and uploaded dataset"),
])
def test_a_failed_job_whose_files_retention_removed_cannot_be_resumed(home, checkpoint, uploaded, lost):
    settings = make_settings(home, keep_failed_runs=0)
    store = JobStore(settings.db_path)
    job_id = _failed_with_files(store, settings, checkpoint, uploaded)
    assert prune_job_files(settings, store) == [job_id]
    with pytest.raises(ConflictError, match=f"retention removed its {lost}.*submit the job again"):
        resume_job(job_id, settings=settings, store=store)
    assert (store.get(job_id).state, store.get(job_id).retention_removed) == ("failed", lost)


def test_a_failed_job_that_had_no_checkpoint_can_still_be_resumed_after_retention(home):
    """Nothing a resume needs was removed: it starts over, as it would have anyway."""
    settings = make_settings(home, keep_failed_runs=0)
    store = JobStore(settings.db_path)
    job_id = _failed_with_files(store, settings, checkpoint=False, uploaded=False)
    assert prune_job_files(settings, store) == [job_id]
    assert store.get(job_id).retention_removed is None
    assert resume_job(job_id, settings=settings, store=store).state == "queued"


def test_a_kept_failed_run_can_be_resumed(home):
    settings = make_settings(home, keep_failed_runs=1)
    store = JobStore(settings.db_path)
    job_id = _failed_with_files(store, settings, checkpoint=True, uploaded=True)
    assert prune_job_files(settings, store) == []
    assert resume_job(job_id, settings=settings, store=store).state == "queued"


def test_an_uploaded_dataset_removed_before_it_was_recorded_refuses_the_resume(home):
    """A database from before the column, or a dataset deleted by hand: the missing file itself says so."""
    import shutil

    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job_id = _failed_with_files(store, settings, checkpoint=True, uploaded=True)
    shutil.rmtree(settings.jobs_dir / job_id / "dataset")
    with pytest.raises(ConflictError, match="uploaded dataset is gone"):
        resume_job(job_id, settings=settings, store=store)


def test_resume_over_http_answers_409_once_retention_removed_the_checkpoints(home):
    with make_client(home, keep_failed_runs=0) as client:
        settings, store = client.app.state.settings, client.app.state.store
        job_id = _failed_with_files(store, settings, checkpoint=True, uploaded=False)
        prune_job_files(settings, store)
        resp = client.post(f"/v1/jobs/{job_id}/resume", headers=AUTH)
        assert resp.status_code == 409
        assert "retention removed its run's checkpoints" in resp.json()["message"]
        assert "submit the job again" in resp.json()["message"]
