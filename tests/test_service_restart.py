"""Restart: queued jobs survive a server restart; a job that was running becomes interrupted and resumable."""

from __future__ import annotations

import httpx

from service.core.config import DEFAULT_MODEL_ID
from service.jobs.store import JobStore
from service.main import create_app
from tests.helpers.service import AUTH, FakeDetector, make_settings, register_dummy_model, running_server


def _spec(i: int) -> dict:
    return {"name": f"job{i}", "dataset": "kitchen", "peft": "none", "steps": 2, "imgsz": 64, "batch": 2}


def test_jobs_survive_a_restart(home):
    register_dummy_model(home, DEFAULT_MODEL_ID)
    (home / "data" / "kitchen").mkdir(parents=True)
    (home / "data" / "kitchen" / "data.yaml").write_text("train: .\nval: .\nnames: [cup]\n")
    settings = make_settings(home, job_workers=0)

    with running_server(create_app(settings, detector_loader=FakeDetector)) as url:
        # the first submission may wait for the job checker child to import the library
        ids = [httpx.post(f"{url}/v1/jobs", json=_spec(i), headers=AUTH, timeout=180).json()["id"] for i in range(3)]
        # the first one is taken by a worker that then disappears with the server (kill -9 style)
        running = JobStore(settings.db_path).claim_next(worker_pid=999_999)
        assert running.id == ids[0]
        assert httpx.get(f"{url}/v1/jobs/{ids[0]}", headers=AUTH).json()["state"] == "running"

    with running_server(create_app(settings, detector_loader=FakeDetector)) as url:
        jobs = {j["id"]: j for j in httpx.get(f"{url}/v1/jobs", headers=AUTH).json()["jobs"]}
        assert set(jobs) == set(ids)
        assert jobs[ids[0]]["state"] == "interrupted" and "resume" in jobs[ids[0]]["error"]
        assert [jobs[i]["state"] for i in ids[1:]] == ["queued", "queued"]
        assert [jobs[i]["name"] for i in ids] == ["job0", "job1", "job2"]
        resumed = httpx.post(f"{url}/v1/jobs/{ids[0]}/resume", headers=AUTH).json()
        assert resumed["state"] == "queued"
        assert 'glasses_vision_jobs{state="queued"} 3' in httpx.get(f"{url}/metrics").text
