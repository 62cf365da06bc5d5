"""The service glue reads the library's real result types (issue 12, item 6): ``TrainResult`` in the job runner,
``ExportResult`` / ``VerifyReport`` / ``QuantizeReport`` in the exporter, ``Detector(threads=)`` in the pool.
Each test hands the glue a real instance and checks that its fields (not guessed ones) reach the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.jobs.store import JobStore
from tests.helpers.service import make_settings


def test_runner_records_the_train_results_own_fields(home, monkeypatch):
    import export.onnx_export  # noqa: F401 - loaded before the patch below
    import training.recipe as recipe
    from service.jobs import exporting, runner

    settings = make_settings(home)
    store = JobStore(settings.db_path)
    data = home / "data" / "k"
    (data / "images").mkdir(parents=True)
    (data / "data.yaml").write_text("train: images\nval: images\nnames: [cup]\n")
    store.create({"request": {"steps": 3, "imgsz": 64, "batch": 2, "base_model": "yolo11n"},
                  "data_yaml": str(data / "data.yaml"), "model_id": "m", "job_dir": "x"})
    job = store.claim_next(worker_pid=1)

    def fake_train(config, on_event=None, should_stop=None):
        on_event({"event": "step", "step": 1, "total_steps": 3, "loss": 2.5, "lr": 1e-3})
        return recipe.TrainResult(run_dir=Path(config.out), status="completed", steps=3, total_steps=3,
                                  metrics={"map50": 0.25, "map50_95": 0.1}, memory={"total": 1234, "weights": 1000},
                                  merged_dir=Path(config.out) / "merged")

    def fake_export(source, out, **kw):
        from tests.test_service_memory import write_constant_detector

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_constant_detector(Path(out), imgsz=64)
        return {"export": {"opset": 17}, "verification": {"passed": True}, "classes": ["cup"], "imgsz": 64}

    monkeypatch.setattr(recipe, "train", fake_train)
    monkeypatch.setattr(exporting, "export_for_registry", fake_export)
    assert runner.run_job(job, settings, store, lambda: False) == "succeeded"
    done = store.get(job.id)
    assert done.memory == {"total": 1234, "weights": 1000}
    assert done.metrics["map50"] == 0.25 and done.metrics["loss"] == 2.5
    assert (done.step, done.total_steps, done.progress) == (3, 3, 1.0)


def test_exporter_reads_export_and_quantize_reports(tmp_path, monkeypatch):
    import export
    from export.onnx_export import ExportResult
    from export.verify import VerifyReport
    from service.jobs import exporting

    report = VerifyReport(images=2, max_abs_diff=1e-5, max_box_diff=1e-4, max_score_diff=1e-6, boxes_reference=3,
                          boxes_onnx=3, matched=3, required=3, min_iou=0.99, class_mismatches=0, conf=0.25,
                          iou_threshold=0.45, match_iou=0.5, passed=True)

    def fake_export_onnx(source, out, **kw):
        Path(out).write_bytes(b"onnx")
        return ExportResult(path=str(out), size_bytes=4, sha256="0", source="s", source_sha256="0", imgsz=(64, 64),
                            opset=17, precision="fp32", dynamic_batch=True, num_nodes=1, op_counts={},
                            merged_adapters=False, export_seconds=0.1, verification=report,
                            metadata={"names": json.dumps(["cup"]), "imgsz": json.dumps([64, 64])})

    monkeypatch.setattr(export, "export_onnx", fake_export_onnx)
    (tmp_path / "src").mkdir()  # classes and input size come from the file's metadata, not the source folder
    info = exporting.export_for_registry(tmp_path / "src", tmp_path / "out" / "m.onnx", verify=True)
    assert info["verification"]["passed"] is True and info["verification"]["matched"] == 3
    assert info["verification"]["match_rate"] == 1.0 and info["export"]["opset"] == 17
    assert info["classes"] == ["cup"] and info["imgsz"] == 64


@pytest.mark.parametrize("threads", [1, 2])
def test_pool_loader_passes_threads_to_the_detector(tmp_path, threads):
    from service.core.inference import runtime_loader
    from tests.test_service_memory import write_constant_detector

    path = tmp_path / "m.onnx"
    write_constant_detector(path, imgsz=64)
    detector = runtime_loader(threads)(path)
    assert detector.session.get_session_options().intra_op_num_threads == threads
