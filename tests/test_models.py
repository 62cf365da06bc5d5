"""DetectionModel: architectures, parts, checkpoint I/O, ultralytics import, class reset."""

from __future__ import annotations

import json
from copy import deepcopy

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel as UltralyticsDetectionModel
from ultralytics.utils.loss import v8DetectionLoss

from models import DetectionModel, create_model, list_models
from models.detection import architecture_names
from models.errors import CheckpointError, ConfigError, NotFoundError, UntrustedCheckpointError

IMG = 64


@pytest.fixture(scope="module")
def yolo11n():
    return DetectionModel("yolo11n", nc=3, names=["cup", "phone", "book"], imgsz=160)


@pytest.mark.parametrize("name", architecture_names())
def test_every_family_and_scale_builds_with_right_shapes(name):
    model = DetectionModel(name, nc=3).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, IMG, IMG))
    anchors = sum((IMG // s) ** 2 for s in (8, 16, 32))
    assert out.shape == (1, 4 + 3, anchors)
    assert model.nc == 3 and model.stride.tolist() == [8.0, 16.0, 32.0]
    model.train()
    raw = model(torch.zeros(2, 3, IMG, IMG))
    assert raw["scores"].shape == (2, 3, anchors)
    assert raw["boxes"].shape == (2, 4 * model.model[-1].reg_max, anchors)


def test_parts_partition_every_parameter_exactly_once(yolo11n):
    assert yolo11n.part_bounds == {"backbone": (0, 11), "neck": (11, 23), "head": (23, 24)}
    all_ids = [id(p) for p in yolo11n.parameters()]
    part_ids = [id(p) for part in ("backbone", "neck", "head") for p in yolo11n.part(part).parameters()]
    assert sorted(all_ids) == sorted(part_ids)
    assert len(set(part_ids)) == len(part_ids)
    # Names inside a part plus "model." are names inside the model.
    model_names = dict(yolo11n.named_parameters())
    for local, param in yolo11n.neck.named_parameters():
        assert model_names["model." + local] is param
        assert yolo11n.part_of("model." + local) == "neck"


def test_yolov8_parts(yolo11n):
    m = DetectionModel("yolov8n", nc=2)
    assert m.part_bounds == {"backbone": (0, 10), "neck": (10, 22), "head": (22, 23)}


def test_train_output_feeds_ultralytics_loss(yolo11n):
    model = deepcopy(yolo11n).train()
    batch = {
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [2.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]]),
    }
    loss, items = v8DetectionLoss(model)(model(torch.rand(2, 3, IMG, IMG)), batch)
    assert torch.isfinite(loss).all() and set(items) == {"box_loss", "cls_loss", "dfl_loss"}
    loss.sum().backward()
    assert model.model[0].conv.weight.grad is not None


def test_save_load_bit_identical(tmp_path, yolo11n):
    model = deepcopy(yolo11n)
    with torch.no_grad():  # give BatchNorm non-trivial statistics
        model.train()(torch.rand(2, 3, IMG, IMG))
    model.eval()
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["names"] == ["cup", "phone", "book"] and config["imgsz"] == 160
    assert not list((tmp_path / "m").glob("*.pt")) and not list((tmp_path / "m").glob(".*tmp"))
    loaded = DetectionModel.load(tmp_path / "m")
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.names == model.names and loaded.imgsz == 160


def test_load_errors(tmp_path, yolo11n):
    with pytest.raises(CheckpointError, match="config.json"):
        DetectionModel.load(tmp_path)
    yolo11n.save(tmp_path / "m")
    other = DetectionModel("yolo11s", nc=3)
    (tmp_path / "m" / "config.json").write_text(json.dumps(other.config()))
    with pytest.raises(CheckpointError, match="does not match"):
        DetectionModel.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        DetectionModel.load(tmp_path / "m")


def _write_ultralytics_checkpoint(path, model):
    """A checkpoint in ultralytics' own format (what its trainer saves: a dict holding a half-precision model)."""
    torch.save(
        {
            "epoch": -1,
            "best_fitness": None,
            "model": deepcopy(model).half(),
            "ema": None,
            "updates": None,
            "optimizer": None,
            "train_args": {"imgsz": 320, "task": "detect"},
            "date": "2026-11-22",
            "version": "8.4.190",
        },
        path,
    )


def test_from_ultralytics_matches_ultralytics_forward(tmp_path):
    reference = UltralyticsDetectionModel("yolo11n.yaml", nc=4, verbose=False)
    reference.names = {0: "a", 1: "b", 2: "c", 3: "d"}
    with torch.no_grad():
        reference.train()(torch.rand(2, 3, IMG, IMG))  # move BatchNorm statistics away from init
    ckpt = tmp_path / "best.pt"
    _write_ultralytics_checkpoint(ckpt, reference)

    with pytest.raises(UntrustedCheckpointError, match="trusted=True"):
        DetectionModel.from_ultralytics(ckpt)
    ours = DetectionModel.from_ultralytics(ckpt, trusted=True)
    assert ours.names == reference.names and ours.imgsz == 320

    theirs = torch.load(ckpt, weights_only=False)["model"].float().eval()
    x = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x)[0])


def test_from_ultralytics_rejects_non_checkpoints(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read"):
        DetectionModel.from_ultralytics(bad, trusted=True)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match="no ultralytics model"):
        DetectionModel.from_ultralytics(tmp_path / "y.pt", trusted=True)


def test_reset_classes_keeps_box_branch_and_features(yolo11n):
    model = deepcopy(yolo11n).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        boxes_before = model(x)[:, :4]
    model.reset_classes(["a", "b", "c", "d", "e"])
    assert model.nc == 5 and model.names[4] == "e" and model.yaml["nc"] == 5
    with torch.no_grad():
        out = model(x)
    assert out.shape[1] == 4 + 5
    assert torch.equal(out[:, :4], boxes_before)
    after = model.state_dict()
    changed = {k for k in before if k not in after or after[k].shape != before[k].shape or not torch.equal(after[k], before[k])}
    head = model.model[-1]
    assert changed == {f"model.23.cv3.{i}.2.{p}" for i in range(head.nl) for p in ("weight", "bias")}
    model.train()
    raw = model(torch.rand(1, 3, IMG, IMG))
    assert raw["scores"].shape[1] == 5


def test_gradient_checkpointing_equal_gradients_and_bn_stats(yolo11n):
    plain, ckpt = deepcopy(yolo11n).train(), deepcopy(yolo11n).train()
    ckpt.set_gradient_checkpointing(("backbone", "neck"))
    x = torch.rand(2, 3, IMG, IMG)
    for m in (plain, ckpt):
        out = m(x)
        (out["scores"].square().mean() + out["boxes"].mean()).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is None:  # frozen by ultralytics (the DFL projection)
            assert q.grad is None, name
            continue
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.allclose(b.float(), c.float(), atol=1e-6), name  # running stats updated exactly once
    with pytest.raises(ConfigError, match="unknown part"):
        ckpt.set_gradient_checkpointing(("body",))


def test_frozen_prefix_keeps_no_activations(yolo11n):
    """Layers before the first trainable one store nothing for backward (what PEFT on later parts relies on)."""

    def saved_numel(model):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            model(torch.rand(1, 3, IMG, IMG))
        return sum(sizes)

    model = deepcopy(yolo11n).train()
    everything = saved_numel(model)
    for i, layer in enumerate(model.model):
        layer.requires_grad_(i >= 5)
    assert model.frozen_prefix_length() == 5
    assert saved_numel(model) < 0.95 * everything


def test_bad_arguments():
    with pytest.raises(ConfigError, match="unknown architecture"):
        DetectionModel("yolo99z")
    with pytest.raises(ConfigError, match="positive"):
        DetectionModel("yolo11n", nc=0)
    with pytest.raises(ConfigError, match="multiple of the model stride"):
        DetectionModel("yolo11n", nc=2, imgsz=100)
    with pytest.raises(ConfigError, match="class names"):
        DetectionModel("yolo11n", nc=3, names=["a", "b"])


def test_registry():
    names = list_models()
    assert "yolo11n" in names and "yolov8x" in names
    assert create_model("yolov8n", nc=2).nc == 2
    with pytest.raises(NotFoundError, match="known names"):
        create_model("resnet50")


def test_atomic_writes_get_normal_permissions(tmp_path):
    """Regression: files written through mkstemp were left mode 0600 (unreadable to other users)."""
    import os

    from models.io import atomic_write_json

    mask = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_cli_import_requires_trust_and_writes_a_model_dir(tmp_path):
    from service.cli import main

    reference = UltralyticsDetectionModel("yolov8n.yaml", nc=2, verbose=False)
    reference.names = {0: "shelf", 1: "price_tag"}
    ckpt = tmp_path / "best.pt"
    _write_ultralytics_checkpoint(ckpt, reference)
    assert main(["import", str(ckpt), "--out", str(tmp_path / "m")]) == 2  # refused without --trust-pickle
    assert not (tmp_path / "m").exists()
    assert main(["import", str(ckpt), "--out", str(tmp_path / "m"), "--trust-pickle"]) == 0
    model = DetectionModel.load(tmp_path / "m")
    assert model.names == {0: "shelf", 1: "price_tag"} and model.imgsz == 320
