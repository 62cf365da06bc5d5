"""The job runner in-process: a stopped job is interrupted with a checkpoint, resume continues from it,
the finished job exports, verifies and registers its model; failures are recorded on the job, not raised."""

from __future__ import annotations

import json
import re

import pytest

from service.api.schemas.jobs import JobCreate
from service.jobs.runner import run_job
from service.jobs.spec import job_log_path, job_run_dir, train_config_values
from service.jobs.store import JobStore
from service.registry import ModelRegistry
from tests.helpers.service import make_settings

IMGSZ = 64


def _queue(store, settings, data_yaml, **request):
    spec = JobCreate(dataset="ego", base_model="yolo11n", peft="none", imgsz=IMGSZ, batch=2, **request)
    job = store.create({"request": spec.model_dump(mode="json"), "data_yaml": str(data_yaml),
                        "uploaded_dataset": False, "model_id": spec.model_id or "tiny-job",
                        "job_dir": str(settings.jobs_dir / "x")})
    return job


def test_train_config_mapping():
    request = JobCreate(dataset="d", peft="lora", peft_settings={"rank": 4, "alpha": 8, "parts": ["neck"]},
                        optimizer="coap", optimizer_settings={"update_interval": 4}, steps=7, imgsz=96,
                        train_settings={"eval_every": 0}).model_dump(mode="json")
    values = train_config_values(request, "/d/data.yaml", "/runs/j", resume=True)
    assert values["rank"] == 4 and values["alpha"] == 8 and values["peft_settings"] == {"parts": ["neck"]}
    assert values["max_steps"] == 7 and values["epochs"] >= 7 and values["imgsz"] == 96
    assert values["optimizer_settings"] == {"update_interval": 4} and values["eval_every"] == 0
    assert values["resume"] == "/runs/j" and values["out"] == "/runs/j" and values["quiet"] is True


@pytest.mark.slow
def test_stop_resume_export_register(home):
    from training.data.synthetic import generate_dataset

    settings = make_settings(home)
    data_yaml = generate_dataset(home / "data" / "ego", domain="egocentric", n=8, imgsz=IMGSZ, seed=0,
                                 val_fraction=0.25)
    store = JobStore(settings.db_path)
    job = _queue(store, settings, data_yaml, steps=3, model_id="tiny-job",
                 train_settings={"log_every": 1, "save_every": 1})
    job = store.claim_next(worker_pid=1234)

    calls = {"n": 0}

    def stop_after_first_step():  # the worker being asked to shut down during step 1
        calls["n"] += 1
        return calls["n"] >= 1

    assert run_job(job, settings, store, stop_after_first_step) == "interrupted"
    parked = store.get(job.id)
    assert parked.state == "interrupted" and parked.step == 1 and "resume" in parked.error
    assert (job_run_dir(settings, job.id) / "checkpoints").is_dir()

    store.requeue_for_resume(job.id)
    job = store.claim_next(worker_pid=1234)
    assert job.resume and job.attempts == 2
    assert run_job(job, settings, store, lambda: False) == "succeeded"
    done = store.get(job.id)
    assert done.state == "succeeded" and done.step == 3 and done.model_id == "tiny-job"
    assert done.memory["total"] > 0 and "map50" in done.metrics
    log = job_log_path(settings, job.id).read_text()
    assert "resumed" in log and "registered model tiny-job" in log
    steps_logged = [int(m) for m in re.findall(r"INFO \[(\d+)/3\] step ", log)]
    assert steps_logged == [1, 2, 3]  # the resumed run went on from step 1, it did not start over

    record = ModelRegistry(settings.models_dir).get("tiny-job")
    assert record.job_id == job.id and record.imgsz == IMGSZ and record.classes and record.size_bytes > 0
    assert record.export["verify"] is True and record.verification is not None
    from export.runtime import Detector

    assert isinstance(Detector(record.path).detect(__import__("numpy").zeros((50, 70, 3), "uint8")), list)


def test_cancelling_a_running_job_stops_it_at_the_next_step(home):
    from training.data.synthetic import generate_dataset

    settings = make_settings(home)
    data_yaml = generate_dataset(home / "data" / "ego", domain="egocentric", n=8, imgsz=IMGSZ, seed=0,
                                 val_fraction=0.25)
    store = JobStore(settings.db_path)
    _queue(store, settings, data_yaml, steps=500, train_settings={"log_every": 1, "eval_every": 0})
    job = store.claim_next(worker_pid=1)
    store.request_cancel(job.id)  # what POST /v1/jobs/{id}/cancel does to a running job
    assert run_job(job, settings, store, lambda: False) == "cancelled"
    cancelled = store.get(job.id)
    assert cancelled.state == "cancelled" and cancelled.step == 1 and cancelled.model_id is None
    assert not ModelRegistry(settings.models_dir).exists("tiny-job")


def test_a_bad_dataset_fails_the_job_with_its_message(home):
    settings = make_settings(home)
    empty = home / "data" / "empty"
    (empty / "images" / "train").mkdir(parents=True)
    (empty / "images" / "val").mkdir(parents=True)
    (empty / "data.yaml").write_text(json.dumps({"path": str(empty), "train": "images/train", "val": "images/val",
                                                 "names": ["cup"]}))
    store = JobStore(settings.db_path)
    _queue(store, settings, empty / "data.yaml", steps=2)
    job = store.claim_next(worker_pid=1)
    assert run_job(job, settings, store, lambda: False) == "failed"
    failed = store.get(job.id)
    assert failed.state == "failed" and "image" in failed.error.lower()
    assert not ModelRegistry(settings.models_dir).exists("tiny-job")


@pytest.mark.parametrize("bad", [{"out": "/x"}, {"resume": "/x"}])
def test_reserved_train_settings_are_refused(bad):
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match="may not set"):
        train_config_values({"train_settings": bad}, "d.yaml", "out", False)
