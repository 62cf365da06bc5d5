"""Regression tests of the service audit (issue 11): one test (or a few) per finding, each failing on the code
before the fix. Numbers in the names follow the issue's findings."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.core.config import DEFAULT_MODEL_ID, Settings
from service.main import create_app
from tests.helpers.service import (
    make_client,
    AUTH,
    FakeDetector,
    image_bytes,
    make_settings,
    register_dummy_model,
    running_server,
    wait_for,
)


@pytest.fixture
def data_root(home):
    root = home / "data"
    (root / "kitchen" / "images").mkdir(parents=True)
    (root / "kitchen" / "labels").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(root / "kitchen" / "images" / "a.png")
    (root / "kitchen" / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "kitchen" / "data.yaml").write_text("train: images\nval: images\nnames: [cup]\n")
    return root


def _job(**overrides):
    spec = {"dataset": "kitchen", "peft": "none", "optimizer": "adamw", "steps": 3, "imgsz": 64, "batch": 2}
    spec.update(overrides)
    return spec


def _error(resp, status, *words):
    assert resp.status_code == status, resp.text
    message = resp.json()["message"]
    for word in words:
        assert word in message, message
    return message


# ---------------------------------------------------------------- 1. dataset confinement
def test_01_image_list_with_paths_outside_the_root_is_refused_without_echo(client, data_root, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    Image.new("RGB", (32, 32)).save(outside / "exists.png")
    ds = data_root / "listed"
    ds.mkdir()
    (ds / "data.yaml").write_text("train: train.txt\nval: train.txt\nnames: [cup]\n")
    messages = []
    for target in (outside / "exists.png", outside / "missing.png"):
        (ds / "train.txt").write_text(f"{target}\n")
        messages.append(_error(client.post("/v1/jobs", json=_job(dataset="listed"), headers=AUTH), 422,
                               "outside the data root"))
    assert messages[0] == messages[1]  # existence outside the root is not revealed
    assert all(str(tmp_path) not in m and "secret" not in m for m in messages)
    (ds / "train.txt").write_text("../../../secret/exists.png\n")  # relative, climbing out
    _error(client.post("/v1/jobs", json=_job(dataset="listed"), headers=AUTH), 422, "outside the data root")
    assert client.get("/v1/jobs", headers=AUTH).json()["jobs"] == []


def test_01_symlinked_label_file_and_image_out_of_the_root_are_refused(client, data_root, tmp_path):
    (tmp_path / "passwd.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    label = data_root / "kitchen" / "labels" / "a.txt"
    label.unlink()
    label.symlink_to(tmp_path / "passwd.txt")
    msg = _error(client.post("/v1/jobs", json=_job(), headers=AUTH), 422, "label file", "leads outside")
    assert str(tmp_path) not in msg
    label.unlink()
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (data_root / "kitchen" / "images" / "b.png").symlink_to(tmp_path / "b.png")
    _error(client.post("/v1/jobs", json=_job(), headers=AUTH), 422, "leads outside")


# ---------------------------------------------------------------- 2. memory on /v1/detect
def test_02_large_frames_are_decoded_reduced_before_any_float_conversion():
    from service.core.images import DecodeBudget, decode_upload

    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000)).save(buf, format="PNG")
    budget = DecodeBudget(10**9)
    out = decode_upload(buf.getvalue(), 10**7, 12_200_000, target=64, budget=budget)
    assert (out.width, out.height) == (4000, 3000) and max(out.rgb.shape[:2]) < 128
    assert out.scale == pytest.approx((4000 / out.rgb.shape[1], 3000 / out.rgb.shape[0]))
    assert budget.used == 0
    # the default pixel limit is what a glasses frame needs (4032x3024), not 40 MP
    assert 4032 * 3024 <= Settings().max_image_pixels < 16_000_000


def test_02_decode_budget_makes_large_decodes_wait_for_room():
    from service.core.images import DecodeBudget

    budget = DecodeBudget(100, timeout=0.3)
    with budget.reserve(80):
        t0 = time.monotonic()
        with pytest.raises(Exception, match="too many large images"):
            with budget.reserve(50):
                pass
        assert time.monotonic() - t0 >= 0.25
    with budget.reserve(150):  # larger than the budget: runs alone
        assert budget.used == 150


def test_02_boxes_of_a_reduced_frame_are_in_the_uploads_pixels(client):
    buf = io.BytesIO()
    Image.new("RGB", (1000, 600), (40, 80, 120)).save(buf, format="JPEG")
    body = client.post("/v1/detect", files={"image": ("a.jpg", buf.getvalue(), "image/jpeg")}).json()
    assert body["image"] == {"width": 1000, "height": 600}
    box = body["detections"][0]  # FakeDetector: inset 1 px of the (reduced) frame it was given
    assert box["x2"] == pytest.approx(1000, abs=10) and box["y2"] == pytest.approx(600, abs=10)


# ---------------------------------------------------------------- 3. every bad job body is a 422 naming the field
@pytest.mark.parametrize("spec, field", [
    (_job(train_settings={"lr": None}), "train_settings.lr"),
    (_job(train_settings={"workers": None}), "train_settings.workers"),
    (_job(train_settings={"ema_decay": None}), "train_settings.ema_decay"),
    (_job(train_settings={"save_every": None}), "train_settings.save_every"),
    (_job(train_settings={"warmup_fraction": "x"}), "train_settings.warmup_fraction"),
    (_job(train_settings={"min_lr_ratio": 2}), "train_settings.min_lr_ratio"),
    (_job(dataset="k" * 300), "dataset"),
    (_job(export={"opset": 11}), "export.opset"),
    (_job(replay_fraction=1.0), "replay_fraction"),
])
def test_03_bad_job_bodies_are_422_naming_the_field(client, data_root, spec, field):
    _error(client.post("/v1/jobs", json=spec, headers=AUTH), 422, field)


def test_03_dataset_symlink_loop_and_long_names_are_422(client, data_root):
    (data_root / "loop").symlink_to(data_root / "loop")
    _error(client.post("/v1/jobs", json=_job(dataset="loop"), headers=AUTH), 422, "dataset")
    (data_root / "kitchen" / "data.yaml").write_text("train: spin\nval: images\nnames: [cup]\n")
    (data_root / "kitchen" / "spin").symlink_to(data_root / "kitchen" / "spin")
    _error(client.post("/v1/jobs", json=_job(), headers=AUTH), 422, "symlink loop")
    _error(client.post("/v1/jobs", json=_job(dataset="d/" + "x" * 300), headers=AUTH), 422, "dataset")


def test_03_bounds_table_covers_every_train_config_field_and_opsets_are_the_exporters():
    from export.onnx_export import MAX_OPSET, MIN_OPSET
    from service.api.schemas import jobs as schema
    from training.config import TrainConfig
    from training.settings import BOUNDS

    assert set(BOUNDS) == set(TrainConfig.field_names())
    assert (schema.MIN_OPSET, schema.MAX_OPSET) == (MIN_OPSET, MAX_OPSET)
    # one set of defaults: the job's are TrainConfig's
    defaults = schema.JobCreate()
    assert (defaults.peft, defaults.optimizer, defaults.imgsz, defaults.batch) == (
        TrainConfig.peft, TrainConfig.optimizer, TrainConfig.imgsz, TrainConfig.batch)


# ---------------------------------------------------------------- 4. relative home; workers must see the API's database
def test_04_paths_are_absolute_and_readiness_fails_when_a_worker_polls_another_database(home, monkeypatch):
    monkeypatch.chdir(home)
    settings = Settings(home=Path("rel-home"), data_root=Path("rel-data"), api_keys=["k"])
    assert settings.home == home / "rel-home" and settings.data_root == home / "rel-data"

    import service.jobs.supervisor as sup

    real = sup.worker_command

    def elsewhere(s):  # a worker that polls another home's database (what a relative --home did)
        return real(s.model_copy(update={"home": home / "other-home"}))

    monkeypatch.setattr(sup, "worker_command", elsewhere)
    with make_client(home, job_workers=1) as c:
        time.sleep(3)
        resp = c.get("/readyz")
        _error(resp, 503, "has not polled the service's job database")
    monkeypatch.setattr(sup, "worker_command", real)
    app = create_app(make_settings(home, job_workers=1), detector_loader=FakeDetector)
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 30, what="worker heartbeat")


# ---------------------------------------------------------------- 5. 16-bit and float images
def test_05_sixteen_bit_png_and_float_tiff_are_scaled_not_clipped():
    from service.core.images import decode_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    rgb = decode_image(buf.getvalue(), 10**7, 10**7)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    np.testing.assert_allclose(rgb[..., 0].astype(float), ramp / 257.0, atol=1.0)
    assert 120 < rgb.mean() < 135  # clipping made this ~254
    buf = io.BytesIO()
    Image.fromarray((ramp / 65535.0).astype(np.float32), mode="F").save(buf, format="TIFF")
    rgb = decode_image(buf.getvalue(), 10**7, 10**7)
    np.testing.assert_allclose(rgb[..., 0].astype(float), ramp / 257.0, atol=1.0)


# ---------------------------------------------------------------- 6. private key, home and database
def test_06_key_file_is_never_readable_by_others(tmp_path, monkeypatch):
    from service.core import security
    from service.jobs.store import JobStore

    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(stat.S_IMODE(os.stat(src).st_mode))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    old = os.umask(0o022)
    try:
        settings = Settings(home=tmp_path / "h")
        security.prepare_home(settings)
        security.load_api_keys(settings)
        store = JobStore(settings.db_path)
        store.create({"request": {}})
    finally:
        os.umask(old)
    assert seen and all(mode == 0o600 for mode in seen)
    assert stat.S_IMODE(settings.api_key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.home.stat().st_mode) == 0o700
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{settings.db_path}{suffix}")
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


# ---------------------------------------------------------------- 7. the API process never imports torch
_NO_TORCH = r"""
import json, sys
from fastapi.testclient import TestClient
from service.main import create_app
from tests.helpers.service import FakeDetector, make_settings, register_dummy_model, AUTH, wait_for
from pathlib import Path
home = Path(sys.argv[1])
register_dummy_model(home, "glasses-base-yolo11n", classes=["thing"], imgsz=64)
root = home / "data" / "kitchen"
(root / "images").mkdir(parents=True)
(root / "data.yaml").write_text("train: images\nval: images\nnames: [cup]\n")
with TestClient(create_app(make_settings(home), detector_loader=FakeDetector)) as c:
    good = c.post("/v1/jobs", headers=AUTH, json={"dataset": "kitchen", "steps": 2, "imgsz": 64, "batch": 2})
    bad = c.post("/v1/jobs", headers=AUTH, json={"dataset": "kitchen", "optimizer": "sgd-magic"})
    peft = c.post("/v1/jobs", headers=AUTH, json={"dataset": "kitchen", "peft": "lora", "peft_settings": {"bogus": 1}})
print(json.dumps({"good": good.status_code, "bad": [bad.status_code, bad.json()["message"]],
                  "peft": [peft.status_code, peft.json()["message"]],
                  "torch": "torch" in sys.modules, "ultralytics": "ultralytics" in sys.modules}))
"""


@pytest.mark.slow
def test_07_job_submission_never_imports_torch_in_the_api_process(home):
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(home)], cwd=repo, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["good"] == 201, out
    assert out["bad"][0] == 422 and "unknown optimizer" in out["bad"][1], out
    assert out["peft"][0] == 422 and "bogus" in out["peft"][1], out
    assert out["torch"] is False and out["ultralytics"] is False, out


# ---------------------------------------------------------------- 8. OpenAPI
def test_08_openapi_validates_refs_resolve_and_detect_key_is_optional(client):
    from openapi_spec_validator import validate

    doc = client.get("/openapi.json").json()
    validate(doc)
    text = json.dumps(doc)
    assert "#/$defs/" not in text and '"$defs"' not in text
    assert "ExportOptions" in doc["components"]["schemas"]
    detect = doc["paths"]["/v1/detect"]["post"]
    assert {} in detect["security"]  # no key needed by default
    assert "400" in detect["responses"] and "400" in doc["paths"]["/v1/jobs"]["post"]["responses"]


@pytest.mark.slow
def test_08_schemathesis_generated_requests_never_get_a_500(home, data_root):
    """Requests generated from the OpenAPI document (bodies included: the job body's refs must resolve)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings as hsettings

    with make_client(home) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, what="readyz")
        schema = schemathesis.openapi.from_asgi("/openapi.json", c.app)
        failures, calls = [], []
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @hsettings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def run(case):
                resp = case.call(headers=AUTH)
                calls.append((case.operation.method, case.operation.path, case.body is not None))
                if resp.status_code >= 500:
                    failures.append((case.operation.method, case.operation.path, resp.status_code, resp.text[:200]))

            run()
        assert not failures, failures[:5]
        assert any(m.upper() == "POST" and p == "/v1/jobs" and has_body for m, p, has_body in calls)


# ---------------------------------------------------------------- 9. request-body timeout
def test_09_slow_body_gets_408_and_holds_no_inference_slot(home):
    register_dummy_model(home, DEFAULT_MODEL_ID, classes=["thing"], imgsz=64)
    app = create_app(make_settings(home, request_body_timeout_s=1.0), detector_loader=FakeDetector)
    with running_server(app) as url:
        wait_for(lambda: app.state.ready, 10, what="ready")
        host, port = url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
                      b"Content-Length: 1048576\r\n\r\n--zz\r\n")
            t0 = time.monotonic()
            time.sleep(0.3)
            assert app.state.limiter.in_flight == 0
            reply = s.recv(4096)
            elapsed = time.monotonic() - t0
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert elapsed < 5


# ---------------------------------------------------------------- 10. queue briefly instead of refusing at once
def test_10_requests_beyond_the_limit_wait_in_a_bounded_queue(home):
    gate = threading.Event()
    frame = {"image": ("a.png", image_bytes(), "image/png")}
    with make_client(home, loader=lambda p: FakeDetector(p, gate=gate), max_concurrent_inference=1,
                 inference_queue=1, inference_queue_timeout_s=5) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, what="ready")
        results = {}
        threads = [threading.Thread(target=lambda k=k: results.setdefault(k, c.post("/v1/detect", files=frame)))
                   for k in ("first", "queued")]
        threads[0].start()
        wait_for(lambda: c.app.state.limiter.in_flight == 1, 10, what="first in flight")
        threads[1].start()
        wait_for(lambda: c.app.state.limiter.waiting == 1, 10, what="second queued")
        _error(c.post("/v1/detect", files=frame), 429, "queue 1")  # queue full: refused at once
        gate.set()
        for t in threads:
            t.join(10)
        assert results["first"].status_code == 200 and results["queued"].status_code == 200
    defaults = Settings()
    assert defaults.max_concurrent_inference == defaults.detect_batch_size * defaults.detect_batch_parallel
    assert defaults.inference_queue > 0
    assert Settings(detect_batch_size=1, detect_batch_parallel=3).max_concurrent_inference == 3


def test_10_a_request_that_waits_too_long_gets_503(home):
    gate = threading.Event()
    frame = {"image": ("a.png", image_bytes(), "image/png")}
    with make_client(home, loader=lambda p: FakeDetector(p, gate=gate), max_concurrent_inference=1,
                 inference_queue=1, inference_queue_timeout_s=0.5) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, what="ready")
        t = threading.Thread(target=lambda: c.post("/v1/detect", files=frame))
        t.start()
        wait_for(lambda: c.app.state.limiter.in_flight == 1, 10, what="first in flight")
        resp = c.post("/v1/detect", files=frame)
        _error(resp, 503, "no inference slot")
        assert resp.headers["retry-after"]
        gate.set()
        t.join(10)


# ---------------------------------------------------------------- 11. quotas and bounds
@pytest.mark.parametrize("spec, field", [
    (_job(train_settings={"workers": 64}), "train_settings.workers"),
    (_job(peft="lora", peft_settings={"rank": 10**9}), "rank"),
    (_job(batch=100_000), "batch"),
    (_job(imgsz=4096), "imgsz"),
    (_job(steps=10**9), "steps"),
    (_job(train_settings={"accumulate": 10**6}), "train_settings.accumulate"),
])
def test_11_every_numeric_setting_is_bounded(client, data_root, spec, field):
    _error(client.post("/v1/jobs", json=spec, headers=AUTH), 422, field)


def test_11_active_jobs_per_key_and_uploaded_bytes_are_capped(home, data_root):
    from service.api.deps import key_owner
    from tests.helpers.service import yolo_zip

    with make_client(home, max_active_jobs_per_key=2, max_active_dataset_bytes=1000) as c:
        store = c.app.state.store
        owner = key_owner(AUTH["X-API-Key"])
        for _ in range(2):
            store.create({"request": {}, "owner": owner})
        _error(c.post("/v1/jobs", json=_job(), headers=AUTH), 429, "limit 2")
        for job in store.list():
            store.request_cancel(job.id)
        store.create({"request": {}, "owner": "someone-else", "dataset_bytes": 1000})
        resp = c.post("/v1/jobs", headers=AUTH, files={"dataset": ("d.zip", yolo_zip(), "application/zip")})
        _error(resp, 507, "quota")
        assert not any((home / "jobs").iterdir()) if (home / "jobs").exists() else True


def test_11_ended_jobs_keep_only_their_log(home):
    from service.jobs.retention import prune_job_files
    from service.jobs.store import JobStore

    settings = make_settings(home, keep_failed_runs=1)
    store = JobStore(settings.db_path)
    ids = {}
    for name, state in (("ok", "succeeded"), ("old-fail", "failed"), ("new-fail", "failed"), ("queued", None)):
        job = store.create({"request": {}})
        if state:
            store.claim_next(worker_pid=1)
            store.finish(job.id, state)
            time.sleep(0.01)
        ids[name] = job.id
        for part in ("run/checkpoints", "dataset/images"):
            (settings.jobs_dir / job.id / part).mkdir(parents=True)
            (settings.jobs_dir / job.id / part / "blob").write_bytes(b"x" * 1000)
        (settings.jobs_dir / job.id / "job.log").write_text("log\n")
    prune_job_files(settings, store)
    kept = {name: (settings.jobs_dir / i / "run").exists() for name, i in ids.items()}
    assert kept == {"ok": False, "old-fail": False, "new-fail": True, "queued": True}
    assert all((settings.jobs_dir / i / "job.log").is_file() for i in ids.values())


# ---------------------------------------------------------------- 12. temporary files stay in the job's folder
def test_12_a_jobs_temporary_files_live_and_die_in_its_folder(home, monkeypatch):
    import training.recipe as recipe
    from service.jobs import runner
    from service.jobs.store import JobStore

    settings = make_settings(home)
    store = JobStore(settings.db_path)
    data = home / "data" / "k"
    (data / "images").mkdir(parents=True)
    (data / "data.yaml").write_text("train: images\nval: images\nnames: [cup]\n")
    job = store.create({"request": {"steps": 1, "imgsz": 64, "batch": 2}, "data_yaml": str(data / "data.yaml"),
                        "model_id": "m", "job_dir": str(settings.jobs_dir / "x")})
    job = store.claim_next(worker_pid=os.getpid())
    system_tmp = Path(tempfile.gettempdir())
    before = set(system_tmp.iterdir())
    seen = {}

    def fake_train(config, on_event=None, should_stop=None):
        seen["tempdir"] = tempfile.gettempdir()
        seen["env"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        fd, name = tempfile.mkstemp(prefix="torchinductor_probe")
        os.close(fd)
        seen["file"] = name
        raise RuntimeError("stop here")

    monkeypatch.setattr(recipe, "train", fake_train)
    assert runner.run_job(job, settings, store, lambda: False) == "failed"
    job_tmp = settings.jobs_dir / job.id / "tmp"
    assert seen["tempdir"] == str(job_tmp) and seen["env"] == str(job_tmp)
    assert Path(seen["file"]).parent == job_tmp and not job_tmp.exists()
    assert not any(p.name.startswith("torchinductor_probe") for p in set(system_tmp.iterdir()) - before)
    assert tempfile.gettempdir() == str(system_tmp)


# ---------------------------------------------------------------- issue 12, item 7: thin routes, plain store errors
def test_store_and_registry_errors_name_no_routes(home):
    from models.errors import NotFoundError
    from service.api.routes import jobs as jobs_routes
    from service.jobs.store import FINAL_STATES, JobStore
    from service.registry import ModelRegistry

    store = JobStore(home / "jobs.sqlite3")
    for call in (lambda: store.get("job-x"), lambda: store.request_cancel("job-x"),
                 lambda: ModelRegistry(home / "models").get("nope")):
        with pytest.raises(NotFoundError) as info:
            call()
        assert "/v1/" not in str(info.value)
    job = store.create({"request": {}})
    store.claim_next(worker_pid=1)
    store.mark_interrupted(reason="test")
    assert "resume" in store.get(job.id).error and "/v1/" not in store.get(job.id).error
    source = Path(jobs_routes.__file__).read_text()
    assert "FINAL_STATES" in source and '("succeeded", "failed", "cancelled")' not in source
    assert FINAL_STATES == ("succeeded", "failed", "cancelled")
    import inspect

    assert len(inspect.getsource(jobs_routes.create_job).splitlines()) < 40  # HTTP only; the rest is submit_job


# ---------------------------------------------------------------- replay: a second dataset, confined like the first
def test_replay_is_confined_and_reaches_train_config(client, data_root, tmp_path):
    from service.jobs.spec import train_config_values

    _error(client.post("/v1/jobs", json=_job(replay="../elsewhere", replay_fraction=0.25), headers=AUTH), 422,
           "replay", "'..'")
    (data_root / "source").symlink_to(tmp_path)
    _error(client.post("/v1/jobs", json=_job(replay="source", replay_fraction=0.25), headers=AUTH), 422,
           "replay", "outside the data root")
    _error(client.post("/v1/jobs", json=_job(train_settings={"replay": "/etc"}), headers=AUTH), 422, "may not set replay")
    values = train_config_values({"replay": "src", "replay_fraction": 0.25}, "/root/k/data.yaml", "/runs/j", False,
                                 replay_yaml="/root/src/data.yaml")
    assert values["replay"] == "/root/src/data.yaml" and values["replay_fraction"] == 0.25
