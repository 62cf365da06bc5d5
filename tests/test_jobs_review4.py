"""Fourth review of ``service/jobs``: a worker that lost its job still wrote into the run folder the attempt that
took the job over trains in (its stop checkpoint replaced the new owner's; ``save_checkpoint`` also deletes every
other checkpoint there), and removed the job's temporary folder under it; the job response did not say what
retention removed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from service.jobs import runner
from service.jobs.attempts import start_attempt
from service.jobs.retention import prune_job_files
from service.jobs.spec import job_dir, job_run_dir
from service.jobs.store import JobStore
from tests.helpers.service import AUTH, claimed_upload_job, make_client, make_settings
from training.checkpoint import find_checkpoint, read_checkpoint_info, save_checkpoint

STALE, CURRENT = 111, 222


def _save(run_dir: Path, step: int) -> None:
    """A checkpoint as the recipe's ``save_training_state`` writes it (tiny tensors)."""
    save_checkpoint(run_dir / "checkpoints", step, {"w": torch.full((4,), float(step))}, {"step": step},
                    {"epoch": 0, "epoch_step": step})


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every file below ``folder`` (through the ``run`` link) by its path, and where each symlink points."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = os.readlink(path)
        elif path.is_file():
            out[key] = path.read_bytes()
    return out


@pytest.fixture
def recipe(monkeypatch):
    """A stand-in for ``training.recipe.train`` that writes what the recipe writes into ``config.out``: a metrics
    line and a checkpoint per step and, when ``should_stop`` says so, the stop checkpoint and ``summary.json``.

    ``plans`` maps a worker pid to what its run does: ``steps`` (from the resumed step), ``at_step`` (a callable
    run after that step's checkpoint, before ``should_stop``), ``stop_after`` (the worker shuts down)."""
    seen: list[dict] = []
    plans: dict[int, dict] = {}
    current: list[int] = []

    def build_train_config(request, spec, out, resume=False):
        return SimpleNamespace(out=Path(out), resume=resume)

    def train(config, on_event, should_stop):
        plan, run_dir = plans[current[-1]], config.out
        run_dir.mkdir(parents=True, exist_ok=True)  # the recipe's prepare_run_dir
        start = read_checkpoint_info(find_checkpoint(run_dir))["step"] if config.resume else 0
        seen.append({"pid": current[-1], "out": run_dir, "resume": config.resume, "start": start,
                     "metrics": (run_dir / "metrics.jsonl").read_text() if config.resume else ""})
        step = start
        for step in range(start + 1, start + plan["steps"] + 1):
            with open(run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"kind": "train", "step": step, "loss": 1.0 / step}) + "\n")
            _save(run_dir, step)
            on_event({"event": "step", "step": step, "total_steps": 100})
            if plan.get("at_step") and step == start + plan["at_step"][0]:
                plan["at_step"][1]()
            if should_stop():  # the recipe's stop path: a checkpoint of this step, then its outputs
                _save(run_dir, step)
                (run_dir / "summary.json").write_text(json.dumps({"status": "stopped", "pid": current[-1]}))
                return SimpleNamespace(status="stopped", memory={}, metrics={}, steps=step, total_steps=100)
        return SimpleNamespace(status="completed", memory={}, metrics={}, steps=step, total_steps=100, merged_dir=None)

    monkeypatch.setattr("training.recipe.train", train)
    monkeypatch.setattr(runner, "build_train_config", build_train_config)
    monkeypatch.setattr(runner, "_CANCEL_POLL_SECONDS", 0.0)  # the stop check reads the store at every step

    def run(job, settings, store, worker_stop=lambda: False) -> str:
        current.append(job.worker_pid)
        try:
            return runner.run_job(job, settings, store, worker_stop)
        finally:
            current.pop()

    return SimpleNamespace(plans=plans, seen=seen, run=run)


# ---------------------------------------------------------------- 1. a stale worker writes only its own attempt's folder
def test_a_worker_that_lost_its_job_leaves_the_new_attempts_checkpoints_as_their_owner_wrote_them(home, recipe):
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job, stale = claimed_upload_job(store, STALE, "m-r4")
    written = {}

    def taken_and_resumed():
        """After the stale worker's step 2: a restart takes the job, CURRENT resumes it, trains 3 steps and stops."""
        store.mark_interrupted(worker_pid=STALE)
        store.requeue_for_resume(job.id)
        new = store.claim_next(worker_pid=CURRENT)
        recipe.plans[CURRENT] = {"steps": 3}
        stops = iter([False, False, True])
        assert recipe.run(new, settings, store, worker_stop=lambda: next(stops)) == "interrupted"
        written.update(_snapshot(job_run_dir(settings, job.id)))

    recipe.plans[STALE] = {"steps": 5, "at_step": (2, taken_and_resumed)}
    state = recipe.run(stale, settings, store)

    assert state == "interrupted" and store.get(job.id).state == "interrupted"  # as CURRENT left it
    # the stale worker stopped at its next step; its stop checkpoint and summary went to its own folder, not here
    run = job_run_dir(settings, job.id)
    assert read_checkpoint_info(find_checkpoint(run))["step"] == 5
    assert _snapshot(run) == written
    assert json.loads((run / "summary.json").read_text())["pid"] == CURRENT
    # the new attempt continued from the stale one's last checkpoint (step 2), with its metrics, in its own folder
    first, resumed = recipe.seen
    assert (first["pid"], resumed["pid"]) == (STALE, CURRENT) and resumed["out"] != first["out"]
    assert resumed["resume"] and resumed["start"] == 2
    assert [json.loads(line)["step"] for line in resumed["metrics"].splitlines()] == [1, 2]
    assert run.resolve() == resumed["out"].resolve()


def test_a_worker_that_lost_its_job_leaves_the_temporary_folder_to_the_worker_that_runs_it(home, recipe):
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job, stale = claimed_upload_job(store, STALE, "m-r4")
    tmp = job_dir(settings, job.id) / "tmp"

    def taken():  # CURRENT claimed the job and works in its temporary folder (torch.compile caches, ...)
        store.mark_interrupted(worker_pid=STALE)
        store.requeue_for_resume(job.id)
        store.claim_next(worker_pid=CURRENT)
        (tmp / "cache-of-current").write_text("in use")

    recipe.plans[STALE] = {"steps": 3, "at_step": (1, taken)}
    assert recipe.run(stale, settings, store) == "running"
    assert (tmp / "cache-of-current").read_text() == "in use"


# ---------------------------------------------------------------- 2. attempts, the run link, retention
def test_a_run_folder_made_before_attempts_is_carried_into_the_first_attempt(home):
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job = store.create({"request": {}})
    legacy = job_run_dir(settings, job.id)
    _save(legacy, 4)
    (legacy / "metrics.jsonl").write_text('{"step": 4}\n')
    store.claim_next(worker_pid=STALE)
    store.mark_interrupted(worker_pid=STALE)
    store.requeue_for_resume(job.id)
    job = store.claim_next(worker_pid=CURRENT)
    folder, resumes = start_attempt(settings, job)
    assert resumes and folder == job_dir(settings, job.id) / "attempts" / "2"
    assert legacy.is_symlink() and legacy.resolve() == folder.resolve()
    assert read_checkpoint_info(find_checkpoint(folder))["step"] == 4
    assert (folder / "metrics.jsonl").read_text() == '{"step": 4}\n'


def test_a_fresh_attempt_starts_empty_and_removes_the_earlier_attempts(home):
    settings = make_settings(home)
    store = JobStore(settings.db_path)
    job = store.create({"request": {}})
    first, _ = start_attempt(settings, store.claim_next(worker_pid=STALE))
    _save(first, 1)
    store.finish(job.id, "failed", error="boom")
    store.requeue_for_resume(job.id)
    again = store.claim_next(worker_pid=CURRENT)
    again.resume = False  # e.g. a job queued afresh: nothing is carried over
    second, resumes = start_attempt(settings, again)
    assert not resumes and not any(second.iterdir()) and not first.exists()
    assert job_run_dir(settings, job.id).resolve() == second.resolve()


def test_retention_removes_the_run_link_and_the_attempts_and_records_the_lost_checkpoints(home):
    settings = make_settings(home, keep_failed_runs=0)
    store = JobStore(settings.db_path)
    job = store.create({"request": {}})
    folder, _ = start_attempt(settings, store.claim_next(worker_pid=STALE))
    _save(folder, 1)
    store.finish(job.id, "failed", error="boom")
    assert prune_job_files(settings, store) == [job.id]
    root = job_dir(settings, job.id)
    assert not job_run_dir(settings, job.id).is_symlink() and not (root / "attempts").exists()
    assert store.get(job.id).retention_removed == "run's checkpoints"


# ---------------------------------------------------------------- 3. retention_removed in the job response
def test_the_job_response_says_what_retention_removed(home):
    with make_client(home, keep_failed_runs=0) as client:
        settings, store = client.app.state.settings, client.app.state.store
        job = store.create({"request": {}, "owner": "key-a"})
        store.claim_next(worker_pid=STALE)
        _save(job_run_dir(settings, job.id), 1)
        store.finish(job.id, "failed", error="boom")
        assert client.get(f"/v1/jobs/{job.id}", headers=AUTH).json()["retention_removed"] is None
        prune_job_files(settings, store)
        assert client.get(f"/v1/jobs/{job.id}", headers=AUTH).json()["retention_removed"] == "run's checkpoints"
        listed = client.get("/v1/jobs", headers=AUTH).json()["jobs"]
        assert [j["retention_removed"] for j in listed] == ["run's checkpoints"]
        refused = client.post(f"/v1/jobs/{job.id}/resume", headers=AUTH)
        assert refused.status_code == 409 and "run's checkpoints" in refused.json()["message"]
        field = client.get("/openapi.json").json()["components"]["schemas"]["JobOut"]["properties"]["retention_removed"]
        assert "cannot be resumed" in field["description"] and "submit it again" in field["description"]
