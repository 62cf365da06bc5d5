"""The registry's two-step registration (``prepare``, then ``publish`` or ``discard``) and the sweep of the hidden
folders a worker killed between the two steps leaves behind."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from models.errors import ConfigError
from service.jobs.retention import prepared_model_folder, prune_job_files, sweep_prepared_models
from service.jobs.store import JobStore
from service.registry import ModelRegistry
from tests.helpers.service import _write_identity_onnx, make_settings


def _hidden(registry: ModelRegistry) -> list[str]:
    return sorted(p.name for p in registry.root.iterdir() if p.name.startswith("."))


@pytest.fixture
def onnx_file(tmp_path):
    path = tmp_path / "export" / "model.onnx"
    _write_identity_onnx(path)
    return path


# ---------------------------------------------------------------- prepare / publish / discard
def test_a_prepared_model_is_listed_only_once_published(tmp_path, onnx_file):
    registry = ModelRegistry(tmp_path / "models")
    prepared = registry.prepare("m", onnx_file, move=True, staging=".job-j.1", source="test")
    assert not onnx_file.exists() and registry.ids() == [] and _hidden(registry) == [".job-j.1"]
    assert prepared.record.path == str(registry.root / "m" / "model.onnx")
    record = registry.publish(prepared)
    assert registry.ids() == ["m"] and _hidden(registry) == []
    assert registry.get("m") == record and record.source == "test"


def test_discard_removes_a_prepared_model_and_withdraws_a_published_one(tmp_path, onnx_file):
    registry = ModelRegistry(tmp_path / "models")
    unpublished = registry.prepare("a", onnx_file)
    registry.discard(unpublished)
    assert registry.ids() == [] and _hidden(registry) == [] and onnx_file.exists()  # copied, not moved
    published = registry.prepare("b", onnx_file)
    registry.publish(published)
    registry.discard(published)  # what it was published with failed to be recorded
    assert registry.ids() == [] and _hidden(registry) == [] and not published.published


def test_publish_refuses_an_id_registered_meanwhile_and_keeps_the_other_model(tmp_path, onnx_file):
    registry = ModelRegistry(tmp_path / "models")
    prepared = registry.prepare("m", onnx_file)
    registry.register("m", onnx_file, source="the other")
    with pytest.raises(ConfigError, match="already registered"):
        registry.publish(prepared)
    registry.discard(prepared)
    assert registry.get("m").source == "the other" and _hidden(registry) == []


def test_prepare_replaces_what_a_crash_left_in_its_staging_folder_and_takes_only_hidden_names(tmp_path, onnx_file):
    registry = ModelRegistry(tmp_path / "models")
    (registry.root / ".job-j.1").mkdir()
    (registry.root / ".job-j.1" / "half-written").write_text("x")
    prepared = registry.prepare("m", onnx_file, staging=".job-j.1")
    assert sorted(p.name for p in prepared.folder.iterdir()) == ["model.json", "model.onnx"]
    registry.discard(prepared)
    for name in ("visible", "../outside", ".."):
        with pytest.raises(ValueError, match="hidden name"):
            registry.prepare("m", onnx_file, staging=name)
    registry.register("m", onnx_file)
    with pytest.raises(ConfigError, match="already registered"):  # checked before any work is done
        registry.prepare("m", onnx_file, move=True)
    assert onnx_file.exists() and _hidden(registry) == []


def test_a_plain_registration_never_looks_like_a_jobs_prepared_folder(home, onnx_file):
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    ended = store.create({"request": {}})
    store.finish(ended.id, "failed", error="boom")
    prepared = ModelRegistry(settings.models_dir).prepare(f"job-{ended.id}", onnx_file)  # a registration under way
    assert not prepared.folder.name.startswith(".job-")  # the sweep's names
    assert sweep_prepared_models(settings, store) == [] and prepared.folder.is_dir()


def test_register_is_prepare_and_publish(tmp_path, onnx_file):
    registry = ModelRegistry(tmp_path / "models")
    record = registry.register("m", onnx_file, move=True)
    assert registry.get("m") == record and _hidden(registry) == [] and not onnx_file.exists()


# ---------------------------------------------------------------- the sweep
def _stage(settings, job_id: str, attempt: int):
    folder = settings.models_dir / prepared_model_folder(job_id, attempt)
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"left by a killed worker")
    return folder


def test_the_sweep_keeps_only_the_prepared_model_of_a_job_running_in_that_attempt(home):
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    running = store.create({"request": {}})
    assert store.claim_next(worker_pid=111).attempts == 1
    ended = store.create({"request": {}})
    store.finish(ended.id, "failed", error="boom")
    other_hidden = settings.models_dir / ".m.abc123"  # a registration under way in another process: not a job's
    other_hidden.mkdir(parents=True)
    kept = _stage(settings, running.id, 1)
    stale = [_stage(settings, running.id, 0), _stage(settings, ended.id, 1), _stage(settings, "gone", 3)]
    assert sorted(sweep_prepared_models(settings, store)) == sorted(folder.name for folder in stale)
    assert kept.is_dir() and other_hidden.is_dir() and not any(folder.exists() for folder in stale)
    store.mark_interrupted(worker_pid=111)  # the worker was killed before it published
    prune_job_files(settings, store)  # what the API runs at startup and a worker after each job
    assert not kept.exists() and other_hidden.is_dir()


def test_the_api_startup_sweeps_what_a_killed_worker_prepared(home):
    from service.main import create_app

    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job = store.create({"request": {}})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claimed = store.claim_next(worker_pid=dead.pid)
    folder = _stage(settings, job.id, claimed.attempts)
    with TestClient(create_app(settings)):
        assert store.get(job.id).state == "interrupted"
        assert not folder.exists()
