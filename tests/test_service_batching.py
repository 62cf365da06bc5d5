"""Micro-batching of concurrent detect requests, raw image bodies, and the service's dynamic-batch exports.

The batcher's scheduling is tested with a stand-in runtime that records its batch sizes; that batched
results equal single-frame ones is tested on a real (tiny) exported model.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.errors import ConfigError
from service.core.config import DEFAULT_MODEL_ID, Settings
from service.core.errors import UnsupportedMediaError
from service.core.images import decode_upload
from service.core.inference import Arrival, DetectorPool, FrameJob, MicroBatcher, batchable, run_frames
from service.main import create_app
from tests.helpers.service import FakeDetector, image_bytes, make_settings, register_dummy_model, wait_for

IMGSZ = 64
NAMES = ["cup", "bottle", "phone", "book", "keyboard", "food_label"]


@pytest.fixture(scope="module")
def tiny_onnx_files(tmp_path_factory) -> dict[str, Path]:
    """A YOLO11n at 64 px exported twice: with a dynamic batch axis (the service's) and static batch 1."""
    import torch

    from export import export_onnx
    from models.detection import DetectionModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("batching")
    DetectionModel("yolo11n", names=NAMES, imgsz=IMGSZ).save(root / "model")
    files = {"dynamic": root / "dynamic.onnx", "static": root / "static.onnx"}
    export_onnx(root / "model", files["dynamic"], imgsz=IMGSZ, dynamic_batch=True, verify=False)
    export_onnx(root / "model", files["static"], imgsz=IMGSZ, verify=False)
    return files


def _frames() -> list[bytes]:
    """Frames of different sizes and formats: letterbox padding differs frame to frame."""
    return [image_bytes(97, 71, fmt="PNG", seed=3), image_bytes(64, 64, fmt="JPEG", seed=4),
            image_bytes(40, 120, fmt="PNG", seed=5), image_bytes(150, 90, fmt="JPEG", seed=6)]


def _decoder(data: bytes):
    return lambda: decode_upload(data, 10**7, 10**8, IMGSZ)


# ------------------------------------------------------------------ results equal single-frame runs
def test_a_batch_gives_each_frame_the_boxes_of_a_single_frame_run(tiny_onnx_files):
    from export.runtime import Detector

    det = Detector(tiny_onnx_files["dynamic"], threads=1)
    assert det.batch_size is None and batchable(det)
    jobs = [FrameJob(_decoder(f), conf=0.0001, iou=0.95, max_det=50) for f in _frames()]
    batched = run_frames(det, jobs)
    assert all(r.batch == len(jobs) for r in batched)
    for job, result in zip(jobs, batched):
        single = det.detect(job.decode().rgb, conf=0.0001, iou=0.95, max_det=50)
        assert len(single) > 10, "the tiny model should give many low-score boxes at conf=0.0001"
        assert [d.class_id for d in result.detections] == [d.class_id for d in single]
        # onnxruntime computes each row of a batch as it computes a lone frame (bitwise here); allow float noise
        np.testing.assert_allclose([d.box for d in result.detections], [d.box for d in single], rtol=0, atol=1e-4)
        np.testing.assert_allclose([d.score for d in result.detections], [d.score for d in single], rtol=0, atol=1e-6)


def test_per_frame_thresholds_and_a_bad_frame_fail_only_that_frame(tiny_onnx_files):
    from export.runtime import Detector

    det = Detector(tiny_onnx_files["dynamic"], threads=1)
    frame = _frames()[0]
    jobs = [FrameJob(_decoder(frame), conf=0.0001, iou=0.95, max_det=50), FrameJob(_decoder(b"not an image")),
            FrameJob(_decoder(frame), conf=0.0001, iou=0.95, max_det=3)]
    out = run_frames(det, jobs)
    assert isinstance(out[1], UnsupportedMediaError)
    assert out[0].batch == out[2].batch == 2
    assert len(out[2].detections) == 3 and out[2].detections == out[0].detections[:3]


def test_a_batch_one_file_is_not_batched(tiny_onnx_files):
    from export.runtime import Detector

    static = Detector(tiny_onnx_files["static"], threads=1)
    assert static.batch_size == 1 and not batchable(static)
    assert not batchable(FakeDetector(Path("x")))  # stand-ins without a runtime run one frame per call


# ------------------------------------------------------------------ scheduling
class RecordingRuntime:
    """A dynamic-batch runtime stand-in: every anchor scores class (frame index) so frames are told apart."""

    imgsz = (32, 32)
    names = ["a", "b", "c", "d", "e", "f", "g", "h"]
    batch_size = None

    def __init__(self, delay: float = 0.0):
        self.sizes: list[int] = []
        self.delay = delay

    def raw(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(batch.shape[0])
        if self.delay:
            time.sleep(self.delay)
        out = np.zeros((batch.shape[0], 4 + len(self.names), 1), dtype=np.float32)
        out[:, :4, 0] = (16, 16, 8, 8)
        for i, frame in enumerate(batch):
            out[i, 4 + int(round(float(frame.mean()) * 7)), 0] = 0.9  # the class encodes the frame's brightness
        return out


def _gray_job(level: int) -> FrameJob:
    from service.core.images import Decoded

    rgb = np.full((32, 32, 3), round(level * 255 / 7), dtype=np.uint8)
    return FrameJob(lambda: Decoded(rgb, 32, 32, (1.0, 1.0)))


def _pool(runtime, max_batch: int, wait_s: float) -> DetectorPool:
    from service.core.inference import LoadedModel

    pool = DetectorPool(registry=None, loader=None, max_batch=max_batch, batch_wait_s=wait_s)  # type: ignore[arg-type]
    batcher = MicroBatcher(runtime, "m", max_batch, wait_s, coming=lambda: pool._coming.get("m", 0))
    pool._loaded["m"] = LoadedModel(record=None, detector=runtime, batcher=batcher)  # type: ignore[arg-type]
    return pool


def test_frames_arriving_together_run_as_one_batch_each_with_its_own_result():
    runtime = RecordingRuntime()

    async def main():
        pool = _pool(runtime, max_batch=8, wait_s=5.0)
        batcher = pool._loaded["m"].batcher

        async def request(level: int, delay: float):
            with pool.arriving("m") as arrival:
                await asyncio.sleep(delay)  # reading the body
                return await batcher.detect(_gray_job(level), arrival)

        start = time.monotonic()
        results = await asyncio.gather(*(request(level, 0.01 * level) for level in range(5)))
        return results, time.monotonic() - start

    results, seconds = asyncio.run(main())
    assert runtime.sizes == [5]
    assert [r.detections[0].class_id for r in results] == [0, 1, 2, 3, 4]
    assert seconds < 2.0  # the last arrival starts the batch; the 5 s window is not waited out


def test_a_lone_request_never_waits_and_batches_are_capped():
    runtime = RecordingRuntime()

    async def lone():
        pool = _pool(runtime, max_batch=8, wait_s=30.0)
        with pool.arriving("m") as arrival:
            start = time.monotonic()
            await pool._loaded["m"].batcher.detect(_gray_job(1), arrival)
            return time.monotonic() - start

    assert asyncio.run(lone()) < 5.0 and runtime.sizes == [1]

    runtime.sizes.clear()

    async def many():
        pool = _pool(runtime, max_batch=2, wait_s=30.0)
        batcher = pool._loaded["m"].batcher
        tickets = [Arrival(pool, "m") for _ in range(5)]
        return await asyncio.gather(*(batcher.detect(_gray_job(i), t) for i, t in enumerate(tickets)))

    results = asyncio.run(many())
    assert sorted(runtime.sizes) == [1, 2, 2] and [r.detections[0].class_id for r in results] == [0, 1, 2, 3, 4]


def test_frames_that_start_together_are_split_across_cores():
    runtime = RecordingRuntime(delay=0.05)

    async def main(n: int, max_batch: int, parallel: int):
        pool = _pool(runtime, max_batch=max_batch, wait_s=30.0)
        batcher = pool._loaded["m"].batcher
        batcher.parallel = parallel
        tickets = [Arrival(pool, "m") for _ in range(n)]  # n requests on their way
        results = await asyncio.gather(*(batcher.detect(_gray_job(i % 8), t) for i, t in enumerate(tickets)))
        return [r.detections[0].class_id for r in results], [r.batch for r in results]

    classes, batches = asyncio.run(main(4, max_batch=8, parallel=2))
    assert sorted(runtime.sizes) == [2, 2] and classes == [0, 1, 2, 3] and batches == [2, 2, 2, 2]
    runtime.sizes.clear()
    asyncio.run(main(7, max_batch=2, parallel=2))
    assert sorted(runtime.sizes) == [1, 2, 2, 2]  # the batch cap wins over the split
    runtime.sizes.clear()
    asyncio.run(main(3, max_batch=8, parallel=16))
    assert runtime.sizes == [1, 1, 1]


def test_frames_that_arrive_while_every_lane_is_busy_run_together_when_one_comes_free():
    runtime = RecordingRuntime(delay=0.2)

    async def main():
        pool = _pool(runtime, max_batch=8, wait_s=30.0)  # one lane
        batcher = pool._loaded["m"].batcher
        first = asyncio.ensure_future(batcher.detect(_gray_job(0)))  # alone: runs at once
        await asyncio.sleep(0.05)
        later = [asyncio.ensure_future(batcher.detect(_gray_job(i))) for i in (1, 2, 3)]  # one by one, lane busy
        results = await asyncio.gather(first, *later)
        return [r.detections[0].class_id for r in results], [r.batch for r in results]

    classes, batches = asyncio.run(main())
    assert runtime.sizes == [1, 3] and classes == [0, 1, 2, 3] and batches == [1, 3, 3, 3]


def test_after_more_frames_than_lanes_a_frame_waits_briefly_for_company():
    runtime = RecordingRuntime()

    async def main(parallel: int) -> bool:
        pool = _pool(runtime, max_batch=8, wait_s=0.3)
        batcher = pool._loaded["m"].batcher
        batcher.parallel = parallel
        tickets = [Arrival(pool, "m") for _ in range(2)]  # two frames in the air at once
        await asyncio.gather(*(batcher.detect(_gray_job(i), t) for i, t in enumerate(tickets)))
        runtime.sizes.clear()
        alone = asyncio.ensure_future(batcher.detect(_gray_job(2)))  # fewer than the recent peak of 2
        await asyncio.sleep(0.05)
        ran_alone = alone.done()
        await asyncio.gather(alone, batcher.detect(_gray_job(3)))
        return ran_alone

    assert not asyncio.run(main(parallel=1)) and runtime.sizes == [2]  # one lane: the two pair up
    assert asyncio.run(main(parallel=2)) and runtime.sizes == [1, 1]  # no more frames than lanes: no wait


def test_the_wait_is_bounded_when_an_announced_request_never_comes():
    runtime = RecordingRuntime()

    async def main():
        pool = _pool(runtime, max_batch=8, wait_s=0.2)
        with pool.arriving("m"):  # announced, never sends its frame (its upload stalls)
            with pool.arriving("m") as arrival:
                start = time.monotonic()
                await pool._loaded["m"].batcher.detect(_gray_job(2), arrival)
                return time.monotonic() - start

    waited = asyncio.run(main())
    assert 0.15 < waited < 5.0 and runtime.sizes == [1]


def test_a_cancelled_request_leaves_the_queue_or_waits_for_its_running_frame():
    import threading

    started, release = threading.Event(), threading.Event()

    class Gated(RecordingRuntime):
        def raw(self, batch):
            started.set()
            release.wait(10)
            return super().raw(batch)

    runtime = Gated()

    async def main():
        pool = _pool(runtime, max_batch=8, wait_s=30.0)
        batcher = pool._loaded["m"].batcher
        waiting_for = Arrival(pool, "m")  # someone else is on the way: the frame waits in the queue
        queued = asyncio.ensure_future(batcher.detect(_gray_job(1), Arrival(pool, "m")))
        await asyncio.sleep(0.05)
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        assert batcher._pending == [] and runtime.sizes == []  # it never runs
        waiting_for.leave()

        pool = _pool(runtime, max_batch=8, wait_s=30.0)  # a fresh batcher: no recent peak of 2 frames to wait for
        batcher = pool._loaded["m"].batcher
        running = asyncio.ensure_future(batcher.detect(_gray_job(2), Arrival(pool, "m")))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        running.cancel()
        await asyncio.sleep(0.1)
        still_waiting = not running.done()  # it holds on (and so would its slot) while its frame runs
        release.set()
        await asyncio.gather(running, return_exceptions=True)
        return still_waiting, running.cancelled()

    assert asyncio.run(main()) == (True, True)
    assert runtime.sizes == [1]


def test_a_lone_request_runs_on_the_event_loop_thread_only_when_nothing_else_is_in_the_server():
    import threading

    class ThreadRecording(RecordingRuntime):
        def raw(self, batch):
            self.threads.append(threading.get_ident())
            return super().raw(batch)

    runtime = ThreadRecording()
    runtime.threads = []

    async def main():
        pool = _pool(runtime, max_batch=8, wait_s=0.0)
        batcher = pool._loaded["m"].batcher
        batcher.inline, batcher.parallel = True, 2
        with pool.arriving("m") as arrival:  # alone: no trip to a worker thread
            lone = await batcher.detect(_gray_job(3), arrival)
        loop_thread = threading.get_ident()
        # two requests started in the same turn of the loop: the first one, after its yield, sees the second on
        # its way (as the route counts it from its start), so neither runs inline; both go to lanes

        async def request(level: int):
            with pool.arriving("m") as arrival:
                return await batcher.detect(_gray_job(level), arrival)

        pair = await asyncio.gather(request(0), request(1))
        # with two frames at once in the last second, a later lone frame does not run inline either
        after = await batcher.detect(_gray_job(5))
        big = FrameJob(_gray_job(6).decode, nbytes=batcher.INLINE_MAX_BYTES + 1)
        batcher._peaks, batcher._window_end = [0, 0], 0.0  # forget the peak: only the upload's size stops it now
        large = await batcher.detect(big)
        return loop_thread, lone, pair, after, large, batcher.inline_frames

    loop_thread, lone, pair, after, large, inline_frames = asyncio.run(main())
    assert runtime.threads[0] == loop_thread and inline_frames == 1
    assert all(t != loop_thread for t in runtime.threads[1:]) and runtime.sizes == [1, 1, 1, 1, 1]
    assert [lone.detections[0].class_id, *(r.detections[0].class_id for r in pair), after.detections[0].class_id,
            large.detections[0].class_id] == [3, 0, 1, 5, 6]


def test_inline_errors_reach_the_request_as_a_409():
    async def main():
        pool = _pool(_Exploding(), max_batch=8, wait_s=0.0)
        batcher = pool._loaded["m"].batcher
        batcher.inline = True
        with pytest.raises(Exception) as info:
            await batcher.detect(_gray_job(1))
        return info.value, batcher.running, batcher._running_frames

    error, running, frames = asyncio.run(main())
    assert getattr(error, "http_status", None) == 409 and (running, frames) == (0, 0)


def test_a_lane_that_finishes_takes_its_share_and_leaves_the_rest_for_the_busy_lane():
    import threading

    gates = {0: threading.Event(), 1: threading.Event()}

    class Gated(RecordingRuntime):
        def raw(self, batch):
            level = int(round(float(batch[0].mean()) * 7))
            if batch.shape[0] == 1 and level in gates:
                gates[level].wait(10)
            return super().raw(batch)

    runtime = Gated()

    async def main():
        pool = _pool(runtime, max_batch=8, wait_s=0.0)
        batcher = pool._loaded["m"].batcher
        batcher.parallel = 2
        first = [asyncio.ensure_future(batcher.detect(_gray_job(i))) for i in (0, 1)]  # one per lane, both held
        await asyncio.sleep(0.05)
        later = [asyncio.ensure_future(batcher.detect(_gray_job(i))) for i in (2, 3, 4, 5)]  # queued: lanes busy
        await asyncio.sleep(0.05)
        gates[0].set()  # lane A finishes: it takes 2 of the 4 (its share over 2 lanes), then 1, then 1
        results = await asyncio.gather(first[0], *later)
        gates[1].set()
        results.append(await first[1])
        return [r.detections[0].class_id for r in results], batcher.batches, batcher.frames

    classes, batches, frames = asyncio.run(main())
    # sizes are recorded as each batch passes its gate: frame 1 last
    assert classes == [0, 2, 3, 4, 5, 1] and runtime.sizes == [1, 2, 1, 1, 1] and (batches, frames) == (5, 6)


class _Exploding(RecordingRuntime):
    def raw(self, batch):
        raise RuntimeError("kernel exploded")


class _OneRow(RecordingRuntime):
    def raw(self, batch):
        return super().raw(batch)[:1]  # a broken file: one row whatever the batch


@pytest.mark.parametrize("runtime, message", [(_Exploding, "kernel exploded"), (_OneRow, "1 rows for a batch of 2")],
                         ids=["runtime error", "output ignores the batch axis"])
def test_a_failing_batch_reaches_every_frame_as_a_409_not_a_500(runtime, message):
    async def main():
        pool = _pool(runtime(), max_batch=8, wait_s=1.0)
        batcher = pool._loaded["m"].batcher
        tickets = [Arrival(pool, "m") for _ in range(2)]
        return await asyncio.gather(*(batcher.detect(_gray_job(i), t) for i, t in enumerate(tickets)),
                                    return_exceptions=True)

    errors = asyncio.run(main())
    assert len(errors) == 2 and all(getattr(e, "http_status", None) == 409 and message in str(e) for e in errors)


# ------------------------------------------------------------------ over HTTP
def _boxes(dets) -> np.ndarray:
    return np.asarray([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in dets], dtype=np.float64).reshape(-1, 4)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_concurrent_http_detects_equal_the_runtime(home, tiny_onnx_files, kind):
    from export.runtime import Detector
    from service.core.images import decode_image

    register_dummy_model(home, DEFAULT_MODEL_ID, onnx_file=tiny_onnx_files[kind], classes=NAMES, imgsz=IMGSZ)
    frames = _frames() * 3
    det = Detector(tiny_onnx_files[kind])
    expected = [det.detect(decode_image(f, 10**7, 10**8), conf=0.001, iou=0.7, max_det=30) for f in frames]
    app = create_app(make_settings(home, max_concurrent_inference=16, detect_batch_size=4, detect_batch_wait_ms=20))
    with TestClient(app) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 30, what="ready")
        batcher = app.state.pool._loaded[DEFAULT_MODEL_ID].batcher
        assert (batcher is not None) == (kind == "dynamic")

        def post(frame):
            ctype = "image/png" if frame[:4] == b"\x89PNG" else "image/jpeg"
            return c.post("/v1/detect?conf=0.001&iou=0.7&max_det=30", content=frame, headers={"content-type": ctype})

        with ThreadPoolExecutor(6) as ex:
            responses = list(ex.map(post, frames))
    assert [r.status_code for r in responses] == [200] * len(frames)
    for resp, exp in zip(responses, expected):
        body = resp.json()
        np.testing.assert_allclose(_boxes(body["detections"]), np.asarray([d.box for d in exp]).reshape(-1, 4),
                                   atol=1e-3)
        assert [d["class_name"] for d in body["detections"]] == [d.class_name for d in exp]
    if batcher is not None:
        assert batcher.frames == len(frames) and batcher.batches <= len(frames)


def test_raw_body_multipart_and_json_give_the_same_answer(home):
    import base64

    register_dummy_model(home, DEFAULT_MODEL_ID, classes=["thing"], imgsz=64)
    frame = image_bytes(80, 60, fmt="JPEG")
    app = create_app(make_settings(home, max_upload_bytes=50_000), detector_loader=FakeDetector)
    with TestClient(app) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, what="ready")
        raw = c.post("/v1/detect", content=frame, headers={"content-type": "image/jpeg"})
        multi = c.post("/v1/detect", files={"image": ("f.jpg", frame, "image/jpeg")})
        js = c.post("/v1/detect", json={"image_base64": base64.b64encode(frame).decode()})
        assert raw.status_code == multi.status_code == js.status_code == 200
        assert raw.headers["content-type"] == "application/json"
        assert raw.json() == {**multi.json(), "inference_ms": raw.json()["inference_ms"]}
        assert raw.json()["detections"] == js.json()["detections"] and raw.json()["image"] == {"width": 80, "height": 60}

        big = c.post("/v1/detect", content=b"\xff" * 60_000, headers={"content-type": "image/png"})
        assert big.status_code == 413 and big.json()["error"] == "PayloadTooLargeError"
        empty = c.post("/v1/detect", content=b"", headers={"content-type": "image/jpeg"})
        assert empty.status_code == 415 and "empty" in empty.json()["message"]
        junk = c.post("/v1/detect", content=b"GIF89a not really", headers={"content-type": "image/gif"})
        assert junk.status_code == 415
        text = c.post("/v1/detect", content=b"hello", headers={"content-type": "text/plain"})
        assert text.status_code == 415 and "image/jpeg" in text.json()["message"]
        doc = c.get("/openapi.json").json()["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
        assert {"image/jpeg", "image/png", "multipart/form-data", "application/json"} <= set(doc)


# ------------------------------------------------------------------ settings and exports
def test_batch_settings_come_from_the_environment_and_are_bounded(tmp_path):
    s = Settings.from_env({"GLASSES_VISION_DETECT_BATCH_SIZE": "4", "GLASSES_VISION_DETECT_BATCH_WAIT_MS": "1.5"},
                          home=tmp_path)
    assert s.detect_batch_size == 4 and s.detect_batch_wait_ms == 1.5
    defaults = Settings(home=tmp_path)
    assert defaults.detect_batch_size > 1 and 0 < defaults.detect_batch_wait_ms <= 2.0
    assert defaults.detect_inline_when_idle is True
    assert Settings.from_env({"GLASSES_VISION_DETECT_INLINE_WHEN_IDLE": "false"}, home=tmp_path).detect_inline_when_idle is False
    for bad in ({"GLASSES_VISION_DETECT_BATCH_SIZE": "0"}, {"GLASSES_VISION_DETECT_BATCH_WAIT_MS": "-1"},
                {"GLASSES_VISION_DETECT_BATCH_SIZE": "100000"}, {"GLASSES_VISION_DETECT_INLINE_WHEN_IDLE": "sometimes"}):
        with pytest.raises(ConfigError):
            Settings.from_env(bad, home=tmp_path)


def test_service_exports_have_a_dynamic_batch_axis(tmp_path, monkeypatch):
    import export
    from export.onnx_export import ExportResult
    from service.jobs import exporting

    seen = {}

    def fake_export_onnx(source, out, **kw):
        seen.update(kw)
        Path(out).write_bytes(b"onnx")
        return ExportResult(path=str(out), size_bytes=4, sha256="0", source="s", source_sha256="0", imgsz=(64, 64),
                            opset=17, precision="fp32", dynamic_batch=kw.get("dynamic_batch", False), num_nodes=1,
                            op_counts={}, merged_adapters=False, export_seconds=0.1, verification=None,
                            metadata={"names": json.dumps(["cup"])})

    monkeypatch.setattr(export, "export_onnx", fake_export_onnx)
    (tmp_path / "src").mkdir()
    info = exporting.export_for_registry(tmp_path / "src", tmp_path / "m.onnx", verify=False)
    assert seen["dynamic_batch"] is True and info["export"]["dynamic_batch"] is True
    assert exporting.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "s.onnx"), "--static-batch"]) == 0
    assert seen["dynamic_batch"] is False

