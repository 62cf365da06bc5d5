"""Races and orderings found in a review of ``service/jobs``: limits checked apart from the insert they guard,
retention that ranks failed jobs by submission time, a cancel request lost when the worker stops."""

from __future__ import annotations

import io
import threading
import time

import pytest

from service.api.schemas.jobs import JobCreate
from service.core.errors import InsufficientStorageError, TooManyRequestsError
from service.jobs.retention import prune_job_files
from service.jobs.store import JobStore
from service.jobs.submit import submit_job
from service.registry import ModelRegistry
from tests.helpers.service import make_settings, yolo_zip


class _BothCheckedFirst:
    """A job checker that lets no submission through until both have been checked (two requests at once)."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=20)

    def check(self, values, export) -> None:
        self.barrier.wait()


def _submit_twice(settings, store, spec: JobCreate, upload: bytes | None) -> list:
    registry, checker = ModelRegistry(settings.models_dir), _BothCheckedFirst()
    results: list = []

    def submit() -> None:
        try:
            results.append(submit_job(spec, io.BytesIO(upload) if upload else None, owner="key-a", settings=settings,
                                      store=store, registry=registry, checker=checker))
        except (TooManyRequestsError, InsufficientStorageError) as exc:
            results.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_two_submissions_at_once_cannot_both_take_the_last_job_place(home):
    settings = make_settings(home, max_active_jobs_per_key=1)
    (settings.resolved_data_root / "kitchen").mkdir(parents=True)
    (settings.resolved_data_root / "kitchen" / "data.yaml").write_text("train: .\nval: .\nnames: [cup]\n")
    store = JobStore(settings.db_path)
    results = _submit_twice(settings, store, JobCreate(dataset="kitchen", steps=2), None)
    assert store.active_for("key-a") == 1
    assert sum(isinstance(r, TooManyRequestsError) for r in results) == 1


def test_two_uploads_at_once_cannot_both_fill_the_disk_quota(home):
    upload = yolo_zip()
    settings = make_settings(home, max_active_dataset_bytes=len(upload) * 3 // 2)
    store = JobStore(settings.db_path)
    results = _submit_twice(settings, store, JobCreate(steps=2), upload)
    assert store.active_dataset_bytes() <= settings.max_active_dataset_bytes
    refused = [r for r in results if isinstance(r, InsufficientStorageError)]
    assert len(refused) == 1
    assert "GLASSES_VISION_MAX_ACTIVE_DATASET_BYTES" in str(refused[0])  # says what to raise
    assert len(list(settings.jobs_dir.iterdir())) == 1  # the refused one left nothing behind


def test_an_upload_refused_for_a_full_quota_says_which_jobs_hold_it_and_what_to_raise(home):
    settings = make_settings(home, max_active_dataset_bytes=1000)
    store = JobStore(settings.db_path)
    parked = store.create({"request": {}, "owner": "key-b", "dataset_bytes": 1000})
    store.claim_next(worker_pid=1)
    store.mark_interrupted(worker_pid=1)
    assert store.get(parked.id).state == "interrupted"  # still holds its upload
    with pytest.raises(InsufficientStorageError) as refused:
        submit_job(JobCreate(steps=2), io.BytesIO(yolo_zip()), owner="key-a", settings=settings, store=store,
                   registry=ModelRegistry(settings.models_dir), checker=_BothCheckedFirst())
    assert "interrupted" in str(refused.value) and "GLASSES_VISION_MAX_ACTIVE_DATASET_BYTES" in str(refused.value)


def test_retention_keeps_the_run_of_the_job_that_failed_last(home):
    """A job submitted long ago that fails now (e.g. after a resume) keeps its checkpoints, as its error says."""
    settings = make_settings(home, keep_failed_runs=1)
    store = JobStore(settings.db_path)
    old, new = store.create({"request": {}}), store.create({"request": {}})
    for job in (old, new):
        store.claim_next(worker_pid=1)
        (settings.jobs_dir / job.id / "run").mkdir(parents=True)
    store.finish(new.id, "failed", error="boom")
    time.sleep(0.01)
    store.finish(old.id, "failed", error="worker died; resume the job to continue from its last checkpoint")
    prune_job_files(settings, store)
    assert (settings.jobs_dir / old.id / "run").is_dir()
    assert not (settings.jobs_dir / new.id / "run").exists()


def test_a_cancel_request_is_not_lost_when_the_worker_stops_at_the_same_time(home, monkeypatch):
    import training.recipe as recipe
    from service.jobs import runner
    from training.recipe import TrainResult

    settings = make_settings(home)
    store = JobStore(settings.db_path)
    store.create({"request": JobCreate(dataset="d", steps=2).model_dump(mode="json"), "data_yaml": "d.yaml",
                  "uploaded_dataset": True, "model_id": "m"})
    job = store.claim_next(worker_pid=1)
    worker = {"stopping": False}

    def fake_train(config, on_event=None, should_stop=None):
        assert should_stop() is False  # step 1: the cancel flag is polled, not set yet
        store.request_cancel(job.id)  # POST /cancel arrives ...
        worker["stopping"] = True  # ... and SIGTERM, both within the 0.5 s between polls
        should_stop()
        return TrainResult(run_dir=config.out, status="stopped", steps=1, total_steps=2)

    monkeypatch.setattr(recipe, "train", fake_train)
    monkeypatch.setattr(runner, "build_train_config", lambda request, spec, out, resume=False: type(
        "Config", (), {"out": out})())
    assert runner.run_job(job, settings, store, lambda: worker["stopping"]) == "cancelled"
    assert store.get(job.id).state == "cancelled"


def test_the_replay_set_of_an_uploaded_job_is_confined_again_before_training(home, tmp_path):
    """The data root may change between submission and run: the replay set is re-checked with an upload too."""
    from models.errors import DataError
    from service.jobs.runner import _recheck_datasets

    settings = make_settings(home)
    replay = settings.resolved_data_root / "replay"
    (replay / "images").mkdir(parents=True)
    (replay / "data.yaml").write_text("train: images\nval: images\nnames: [cup]\n")
    store = JobStore(settings.db_path)
    job = store.create({"request": {}, "data_yaml": str(home / "jobs" / "j" / "dataset" / "data.yaml"),
                        "uploaded_dataset": True, "replay_yaml": str(replay / "data.yaml")})
    secret = tmp_path / "outside.jpg"
    secret.write_bytes(b"not yours")
    (replay / "images" / "leak.jpg").symlink_to(secret)  # added after the job was queued
    with pytest.raises(DataError, match="outside the data root"):
        _recheck_datasets(job, settings)


def test_a_model_id_that_a_queued_job_will_register_is_refused_at_submission(home):
    """Otherwise the second job trains to the end, then fails at registration (the id is taken)."""
    from service.core.errors import ConflictError

    settings = make_settings(home)
    (settings.resolved_data_root / "kitchen").mkdir(parents=True)
    (settings.resolved_data_root / "kitchen" / "data.yaml").write_text("train: .\nval: .\nnames: [cup]\n")
    store, registry = JobStore(settings.db_path), ModelRegistry(settings.models_dir)
    checker = type("NoCheck", (), {"check": lambda self, values, export: None})()
    spec = JobCreate(dataset="kitchen", steps=2, model_id="kitchen-v2")
    submit_job(spec, None, owner="key-a", settings=settings, store=store, registry=registry, checker=checker)
    with pytest.raises(ConflictError, match="kitchen-v2"):
        submit_job(spec, None, owner="key-b", settings=settings, store=store, registry=registry, checker=checker)
    assert store.counts()["queued"] == 1


@pytest.mark.parametrize("entries", [
    {"a": b"x", "a/b": b"y", "data.yaml": b"train: .\nval: .\nnames: [a]\n"},  # a file and a folder of one name
    {"data.yaml/": b"", "data.yaml/x": b""},  # 'data.yaml' is a folder
])
def test_a_zip_whose_names_clash_is_a_data_error_not_a_server_error(tmp_path, entries):
    """The client's zip is at fault: 400 with what to fix (an OSError was a 500), and nothing stays behind."""
    from models.errors import DataError
    from service.jobs.datasets import extract_dataset_zip
    from tests.helpers.service import zip_bytes

    (tmp_path / "up.zip").write_bytes(zip_bytes(entries))
    with pytest.raises(DataError):
        extract_dataset_zip(tmp_path / "up.zip", tmp_path / "job" / "dataset", 10**6, 100)
    assert not (tmp_path / "job" / "dataset").exists() and list((tmp_path / "job").iterdir()) == []


def test_a_running_job_with_a_cancel_request_ends_cancelled_when_its_worker_goes_away(home, monkeypatch):
    """Restart, shutdown or a crash before the worker saw the request: the job ends as asked, not resumable."""
    import sys

    from service.jobs import supervisor as sup
    from tests.helpers.service import wait_for

    store = JobStore(make_settings(home).db_path)
    asked, other = store.create({"request": {}}), store.create({"request": {}})
    store.claim_next(worker_pid=11)
    store.claim_next(worker_pid=12)
    store.request_cancel(asked.id)
    assert store.mark_interrupted(reason="the service restarted while it was running") == [other.id]  # API startup
    assert store.get(asked.id).state == "cancelled" and store.get(other.id).state == "interrupted"

    monkeypatch.setattr(sup, "worker_command", lambda settings: [sys.executable, "-c", "import sys; sys.exit(3)"])
    s = sup.WorkerSupervisor(make_settings(home, job_workers=1), store)
    crashed = store.create({"request": {}})
    s.start()
    store.claim_next(worker_pid=s.procs[0].pid)
    store.request_cancel(crashed.id)
    wait_for(lambda: s.procs[0].poll() is not None, 10, what="worker exit")
    s.check()
    s.stop(timeout=5)
    assert store.get(crashed.id).state == "cancelled"


@pytest.mark.parametrize("requested, yaml_text", [
    ("kit\x00chen", None),  # JobCreate lets a NUL through
    ("kitchen", 'train: "images\\0"\nval: images\nnames: [cup]\n'),
])
def test_a_nul_in_a_dataset_path_is_a_data_error_not_a_server_error(tmp_path, requested, yaml_text):
    from models.errors import DataError
    from service.jobs.datasets import resolve_dataset_path

    (tmp_path / "kitchen" / "images").mkdir(parents=True)
    (tmp_path / "kitchen" / "data.yaml").write_text(yaml_text or "train: images\nval: images\nnames: [cup]\n")
    with pytest.raises(DataError):
        resolve_dataset_path(tmp_path, requested)


def test_the_dataset_file_limit_counts_each_image_once(tmp_path):
    """MAX_DATASET_FILES is a number of files: a folder's images were counted by the walk and again per image."""
    from service.jobs.datasets import _Confined

    root = tmp_path.resolve()
    (root / "images").mkdir()
    for i in range(6):
        (root / "images" / f"{i}.jpg").write_bytes(b"x")
    guard = _Confined(root, max_files=7)
    guard.tree(root / "images", "train")  # 6 images (their label files are looked up, not walked): within 7
    assert guard.files == 6
