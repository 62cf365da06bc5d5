"""``GET /v1/jobs/{id}/events``: Server-Sent Events of a job's training progress.

The SSE parser here follows the HTML spec's rules (event / data / id fields, blank line ends an event), so
the tests read the stream as a browser's EventSource would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.routes.events import EtaEstimate, MetricsTail
from service.jobs.spec import job_run_dir
from service.main import create_app
from tests.helpers.service import AUTH, make_settings, running_server, wait_for

REPO = Path(__file__).resolve().parents[1]


def parse_sse(lines):
    """(event, data, id) tuples from an iterable of SSE lines; comments are skipped."""
    event, data, event_id = "message", [], None
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data)), event_id
            event, data, event_id = "message", [], None
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                event_id = value


def _record(step: int, loss: float, time_s: float, **extra) -> str:
    return json.dumps({"kind": "train", "step": step, "epoch": 1, "loss": loss, "box": loss / 2, "lr": 0.01 / step,
                       "grad_norm": 1.5, "time_s": time_s, **extra}) + "\n"


def _fake_running_job(app, settings, job_id: str, total: int = 10):
    """A job in the store, claimed (running) by this process: no worker, the test writes its metrics.jsonl."""
    store = app.state.store
    store.create({"request": {"name": job_id}}, job_id=job_id)
    assert store.claim_next(worker_pid=os.getpid()).id == job_id
    store.update_progress(job_id, step=0, total_steps=total)
    run = job_run_dir(settings, job_id)
    run.mkdir(parents=True, exist_ok=True)
    return store, run / "metrics.jsonl"


# ---------------------------------------------------------------- pieces
def test_metrics_tail_reads_whole_lines_and_restarts_on_a_replaced_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == []  # no file yet
    path.write_text(_record(1, 3.0, 1.0) + _record(2, 2.9, 1.5)[:20])  # the second line is still being written
    assert [r["step"] for r in tail.read()] == [1]
    with open(path, "a") as fh:
        fh.write(_record(2, 2.9, 1.5)[20:] + "not json\n" + _record(3, 2.8, 2.0))
    assert [r["step"] for r in tail.read()] == [2, 3]
    assert tail.read() == []
    replaced = tmp_path / "new.jsonl"  # a resume rewrites the file (atomic replace) keeping the checkpointed steps
    replaced.write_text(_record(1, 3.0, 1.0) + _record(2, 2.9, 1.5))
    os.replace(replaced, path)
    assert [r["step"] for r in tail.read()] == [1, 2]


def test_eta_from_the_step_rate_of_the_current_attempt():
    eta = EtaEstimate()
    assert eta.update(10, 12.0, 100) is None  # the first record's time includes the setup: no rate yet
    assert eta.update(20, 17.0, 100) == pytest.approx(40.0)  # 0.5 s/step, 80 steps left
    assert eta.update(100, 57.0, 100) == 0.0
    assert eta.update(60, 3.0, 100) is None  # the clock went back: a resumed attempt
    assert eta.update(70, 5.0, 100) == pytest.approx(6.0)
    assert eta.update(80, None, 100) is None


# ---------------------------------------------------------------- the endpoint
def test_a_finished_job_replays_its_steps_and_ends(home):
    settings = make_settings(home, load_default_model=False)
    app = create_app(settings)
    with TestClient(app) as c:
        store, metrics = _fake_running_job(app, settings, "job-done", total=3)
        metrics.write_text(_record(1, 3.0, 4.0) + _record(2, 2.5, 4.5)
                           + json.dumps({"kind": "eval", "step": 2, "epoch": 1, "map50": 0.25}) + "\n"
                           + _record(3, 2.0, 5.0))
        store.update_progress("job-done", step=3)
        store.finish("job-done", "succeeded", model_id="m1")

        assert c.get("/v1/jobs/job-done/events").status_code == 401
        missing = c.get("/v1/jobs/nope/events", headers=AUTH)
        assert missing.status_code == 404 and "nope" in missing.json()["message"]
        with c.stream("GET", "/v1/jobs/job-done/events", headers=AUTH) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["cache-control"] == "no-cache"
            events = list(parse_sse(resp.iter_lines()))
        # a client that saw step 2 reconnects: it gets step 3 only
        with c.stream("GET", "/v1/jobs/job-done/events", headers={**AUTH, "Last-Event-ID": "2"}) as resp:
            resumed = [e for e in parse_sse(resp.iter_lines()) if e[0] == "step"]

    kinds = [e[0] for e in events]
    assert kinds == ["state", "step", "step", "eval", "step", "end"], kinds
    steps = [data for kind, data, _ in events if kind == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [e[2] for e in events if e[0] == "step"] == ["1", "2", "3"]
    assert steps[0] == {"step": 1, "total_steps": 3, "epoch": 1, "loss": 3.0, "lr": 0.01, "elapsed_s": 4.0,
                        "eta_s": None, "box": 1.5, "grad_norm": 1.5}
    assert steps[1]["eta_s"] == pytest.approx(0.5) and steps[2]["eta_s"] == 0.0
    assert events[3][1] == {"step": 2, "epoch": 1, "map50": 0.25}
    assert events[-1][1]["state"] == "succeeded" and events[-1][1]["model_id"] == "m1"
    assert [data["step"] for _, data, _ in resumed] == [3]


def test_a_running_job_streams_live_over_real_http(home):
    """Real uvicorn: steps appear as the recipe appends them; the state change and the end follow."""
    settings = make_settings(home, load_default_model=False)
    app = create_app(settings)
    with running_server(app) as url:
        store, metrics = _fake_running_job(app, settings, "job-live", total=4)
        metrics.write_text(_record(1, 3.0, 2.0))
        seen: list[tuple] = []
        with httpx.Client(timeout=30) as client:
            with client.stream("GET", f"{url}/v1/jobs/job-live/events", headers=AUTH) as resp:
                stream = parse_sse(resp.iter_lines())
                seen.append(next(stream))
                assert seen[-1][0] == "state" and seen[-1][1]["state"] == "running"
                seen.append(next(stream))
                assert seen[-1][0] == "step" and seen[-1][1]["step"] == 1
                t0 = time.monotonic()
                with open(metrics, "a") as fh:  # the recipe logs two more steps while the client waits
                    fh.write(_record(2, 2.6, 3.0) + _record(3, 2.4, 4.0))
                seen.append(next(stream))
                seen.append(next(stream))
                assert [s[1]["step"] for s in seen[-2:]] == [2, 3]
                assert time.monotonic() - t0 < 5, "a new line should reach the client within a poll or two"
                assert seen[-1][1]["eta_s"] == pytest.approx(1.0)  # 1 s/step over steps 1..3, 1 step left
                with open(metrics, "a") as fh:
                    fh.write(_record(4, 2.2, 5.0))
                store.update_progress("job-live", step=4)
                store.finish("job-live", "failed", error="boom: exported model failed verification")
                seen.extend(stream)  # the stream closes itself after the end event
    assert [d["step"] for k, d, _ in seen if k == "step"] == [1, 2, 3, 4]
    assert [d["state"] for k, d, _ in seen if k == "state"] == ["running", "failed"]
    assert seen[-1][0] == "end" and seen[-1][1]["state"] == "failed" and "boom" in seen[-1][1]["error"]


def test_a_queued_job_that_is_cancelled_ends_the_stream(home):
    settings = make_settings(home, load_default_model=False)
    app = create_app(settings)
    with running_server(app) as url:
        app.state.store.create({"request": {}}, job_id="job-q")
        threading.Timer(0.8, lambda: httpx.post(f"{url}/v1/jobs/job-q/cancel", headers=AUTH)).start()
        with httpx.stream("GET", f"{url}/v1/jobs/job-q/events", headers=AUTH, timeout=30) as resp:
            events = list(parse_sse(resp.iter_lines()))
    assert [(k, d["state"]) for k, d, _ in events] == [("state", "queued"), ("state", "cancelled"), ("end", "cancelled")]


def test_ctrl_c_stops_the_server_at_once_with_an_event_stream_open(tmp_path):
    """``glasses-vision serve`` with a client following an unfinished job: Ctrl-C closes the stream and the server
    exits at once, instead of waiting out uvicorn's graceful-shutdown timeout and cancelling the stream."""
    import signal

    from service.jobs.store import JobStore
    from tests.helpers.service import API_KEY, free_port

    home, port = tmp_path / "home", free_port()
    env = dict(os.environ, GLASSES_VISION_API_KEYS=API_KEY, GLASSES_VISION_LOAD_DEFAULT_MODEL="false",
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--home", str(home), "--port", str(port), "--workers", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        wait_for(up, 60, interval=0.2, what="glasses-vision serve to answer")
        JobStore(home / "jobs.sqlite3").create({"request": {}}, job_id="job-open")  # queued; no worker takes it
        with httpx.stream("GET", f"{url}/v1/jobs/job-open/events", headers=AUTH, timeout=30) as resp:
            events = parse_sse(resp.iter_lines())
            first = next(events)
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            rest = list(events)  # returns when the server closes the stream
        out, _ = proc.communicate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert first[0] == "state" and first[1]["state"] == "queued"
    assert rest == []  # no end event: the job did not end, a client reconnects later
    assert proc.returncode == 0, out
    assert elapsed < 10, f"the server took {elapsed:.1f} s to stop"
    assert "graceful shutdown exceeded" not in out, out


_NO_TORCH_SCRIPT = r"""
import json, os, sys
from pathlib import Path
from fastapi.testclient import TestClient
from service.core.config import Settings
from service.jobs.spec import job_run_dir
from service.main import create_app

home = Path(sys.argv[1])
settings = Settings(home=home, api_keys=["k" * 20], job_workers=0, load_default_model=False)
app = create_app(settings)
with TestClient(app) as c:
    store = app.state.store
    store.create({"request": {}}, job_id="j")
    store.claim_next(os.getpid())
    run = job_run_dir(settings, "j")
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 2.0, "lr": 0.1, "time_s": 1}) + "\n")
    store.finish("j", "succeeded")
    text = c.get("/v1/jobs/j/events", headers={"X-API-Key": "k" * 20}).text
    assert "event: step" in text and "event: end" in text, text
    assert c.get("/").status_code == 200 and c.get("/metrics").status_code == 200
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "ultralytics")))))
"""


def test_the_api_process_does_not_import_torch(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT, str(tmp_path / "home")], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_events_of_a_real_training_job(home):
    """A real worker process trains: the stream carries the recipe's loss, lr and an ETA live; cancelling the job
    ends the stream (no export, so the test stays short)."""
    from training.data.synthetic import generate_dataset

    generate_dataset(home / "data" / "ego", domain="egocentric", n=8, imgsz=64, seed=0, val_fraction=0.25)
    settings = make_settings(home, job_workers=1, worker_poll_seconds=0.2, load_default_model=False)
    app = create_app(settings)
    spec = {"name": "sse", "dataset": "ego", "base_model": "yolo11n", "peft": "none", "steps": 500, "imgsz": 64,
            "batch": 2, "train_settings": {"eval_every": 0, "log_every": 1}}
    events = []
    with running_server(app) as url:
        created = httpx.post(f"{url}/v1/jobs", json=spec, headers=AUTH, timeout=300)  # submit checks run in a child
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=AUTH, timeout=240) as resp:
            for event in parse_sse(resp.iter_lines()):
                events.append(event)
                if event[0] == "step" and event[1]["step"] == 3:
                    assert httpx.post(f"{url}/v1/jobs/{job_id}/cancel", headers=AUTH, timeout=60).status_code == 200
    steps = [d for k, d, _ in events if k == "step"]
    assert [s["step"] for s in steps[:3]] == [1, 2, 3], events
    assert all(s["total_steps"] == 500 and s["loss"] > 0 and s["lr"] > 0 and s["elapsed_s"] > 0 for s in steps)
    assert steps[0]["eta_s"] is None and steps[2]["eta_s"] > 0
    states = [d["state"] for k, d, _ in events if k == "state"]
    assert "running" in states
    assert events[-1][0] == "end" and events[-1][1]["state"] == "cancelled", events[-1]
