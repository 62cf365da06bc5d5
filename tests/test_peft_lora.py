"""LoRA / rsLoRA / DoRA / BitFit / adapters / QLoRA on YOLO11n: identity at init, exact merge, trainable sets, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models import DetectionModel
from models.errors import ConfigError
from service.layers.peft import (
    AdapterConfig,
    DoRAConfig,
    LoRAConfig,
    LoRALayer,
    QLoRAConfig,
    UnknownMethodError,
    apply_adapters,
    apply_bitfit,
    apply_dora,
    apply_lora,
    apply_peft,
    apply_qlora,
    list_adapters,
    list_peft_methods,
    lora_plus_param_groups,
    merge_lora,
    trainable_report,
    unmerge_lora,
)
from tests.helpers.models import MixedConvNet, make_model
from tests.helpers.peft import images, logits, predict, quiet, rel_diff, train_steps

TOL = 1e-5


def test_readme_seed_example_works_as_written():
    model = DetectionModel(nc=80)
    quiet(apply_lora, model.backbone, rank=8)
    apply_bitfit(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".lora_A." in n and n.startswith("model.0.") for n in trainable)
    assert not any(".lora_" in n and int(n.split(".")[1]) >= 11 for n in trainable)  # LoRA in the backbone only
    assert all(".lora_" in n or n.endswith(".bias") for n in trainable)


@pytest.mark.parametrize(
    "apply",
    [
        lambda m: apply_lora(m, LoRAConfig(rank=4, targets=["backbone", "neck"], max_share=None)),
        lambda m: apply_lora(m, rank=4, use_rslora=True, dropout=0.1, targets=["neck"]),
        lambda m: apply_dora(m, DoRAConfig(rank=4, targets=["backbone"])),
        lambda m: apply_adapters(m, AdapterConfig(reduction=8, after=["neck"])),
        lambda m: apply_bitfit(m),
    ],
    ids=["lora", "rslora+dropout", "dora", "adapters", "bitfit"],
)
def test_fresh_adapter_leaves_outputs_unchanged(apply):
    model = make_model()
    before, raw_before = predict(model), logits(model)
    quiet(apply, model)
    assert rel_diff(predict(model), before) < 1e-6 and rel_diff(logits(model), raw_before) < 1e-6
    if not any(isinstance(m, LoRALayer) and m.use_dora("default") for m in model.modules()):
        assert torch.equal(predict(model), before)  # zero-initialised B / up: exactly nothing changes


@pytest.mark.parametrize(
    "apply",
    [
        lambda m: apply_lora(m, LoRAConfig(rank=8, alpha=16, targets=["backbone", "neck"], train_class_branch=True)),
        lambda m: apply_dora(m, rank=8, targets=["backbone", "head"]),
        lambda m: apply_qlora(m, QLoRAConfig(rank=8, targets=["neck"])),
        lambda m: (apply_lora(m, rank=4, targets=["neck"], use_rslora=True), apply_bitfit(m)),
    ],
    ids=["lora+class-branch", "dora", "qlora", "rslora+bitfit"],
)
def test_merged_equals_unmerged_after_training_and_merge_leaves_a_plain_model(apply, tmp_path):
    model = make_model()
    base_state = {k: v.shape for k, v in model.state_dict().items()}
    base_types = sorted(type(m).__name__ for m in model.modules())
    x = images(1, 128)
    before = predict(model, x)
    quiet(apply, model)
    train_steps(model, steps=2)
    unmerged = predict(model, x)
    assert rel_diff(unmerged, before) > 1e-4  # training changed something
    merge_lora(model, unload=False)
    assert rel_diff(predict(model, x), unmerged) <= TOL
    unmerge_lora(model)
    assert rel_diff(predict(model, x), unmerged) <= TOL
    merge_lora(model)
    merged = predict(model, x)
    assert rel_diff(merged, unmerged) <= TOL
    assert {k: v.shape for k, v in model.state_dict().items()} == base_state
    assert sorted(type(m).__name__ for m in model.modules()) == base_types
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.save(tmp_path / "merged")
    reloaded = DetectionModel.load(tmp_path / "merged")
    assert torch.equal(predict(reloaded, x), merged)


def test_only_adapter_parameters_require_grad():
    model = make_model()
    quiet(apply_lora, model, rank=4, targets=["backbone"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    model = make_model()
    apply_dora(model, rank=4, targets=["model.3.conv"])
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "model.3.conv.lora_A.default.weight", "model.3.conv.lora_B.default.weight", "model.3.conv.lora_magnitude_vector.default"]
    model = make_model()
    apply_bitfit(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".bias") for n in names)
    bn_shifts = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(f"{n}.bias" in names for n in bn_shifts) and not any(f"{n}.weight" in names for n in bn_shifts)
    model = make_model()
    apply_adapters(model, after=[4, 6])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[1] for n in names} == {"4", "6"} and all(".adapter_" in n for n in names)


def test_class_branch_fully_trainable_alongside_lora():
    model = make_model()
    apply_lora(model, rank=4, targets=["head"], train_class_branch=True, max_share=None)
    head = model.model[-1]
    for branch in head.cv3:
        assert not isinstance(branch[-1], LoRALayer)
        assert all(p.requires_grad for p in branch[-1].parameters())
    assert isinstance(head.cv2[0][2], LoRALayer)


def test_lora_on_conv_kinds_and_linear_merges_exactly():
    net = MixedConvNet().eval()
    x = torch.randn(2, 3, 17, 19)
    before = net(x)
    apply_lora(net, rank=3, targets=[nn.Conv2d, "fc"], max_share=None)
    assert isinstance(net.conv, LoRALayer) and isinstance(net.fc, LoRALayer)
    assert not isinstance(net.dw, LoRALayer)  # depthwise: skipped when selected by type
    assert torch.allclose(net(x), before)
    with torch.no_grad():
        for layer in (net.conv, net.fc):
            layer.lora_B["default"].weight.normal_()
    adapted = net(x)
    merge_lora(net)
    assert type(net.conv) is nn.Conv2d and type(net.fc) is nn.Linear
    assert rel_diff(net(x), adapted) <= TOL


def test_grouped_conv_named_exactly_is_refused():
    model = make_model()
    with pytest.raises(ConfigError, match="grouped conv"):
        apply_lora(model, rank=2, targets=["model.10.m.0.attn.pe.conv"])


def test_rank_ratio_and_max_share():
    model = make_model()
    apply_lora(model, rank_ratio=0.25, targets=["model.3.conv", "model.5.conv"], max_share=None)
    c3, c5 = model.model[3].conv, model.model[5].conv
    assert c3.r["default"] == round(0.25 * min(c3.base_layer.in_channels, c3.base_layer.out_channels))
    assert c5.r["default"] == round(0.25 * min(c5.base_layer.in_channels, c5.base_layer.out_channels)) > c3.r["default"]
    model = make_model()
    apply_lora(model, rank=8, targets=["model.0.conv", "model.5.conv"], max_share=0.5, oversize="skip")
    assert not isinstance(model.model[0].conv, LoRALayer) and isinstance(model.model[5].conv, LoRALayer)
    model = make_model()
    with pytest.warns(UserWarning, match="rank lowered"):
        apply_lora(model, rank=8, targets=["model.0.conv"], max_share=0.5)
    layer = model.model[0].conv
    share = layer.r["default"] * (3 * 9 + 16) / (3 * 16 * 9)
    assert layer.r["default"] < 8 and share <= 0.5


def test_rslora_scale_and_lora_plus_groups():
    model = make_model()
    apply_lora(model, rank=4, alpha=8, use_rslora=True, targets=["model.5.conv"])
    assert model.model[5].conv.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    groups = lora_plus_param_groups(model, lr=1e-3, ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    assert groups[1]["params"][0] is model.model[5].conv.lora_B["default"].weight


def test_bitfit_bn_weight_option_and_freeze_keeps_running_stats():
    model = make_model()
    apply_bitfit(model, bn_weight=True, bn_stats="freeze")
    assert model.model[0].bn.weight.requires_grad
    before = model.model[0].bn.running_mean.clone()
    train_steps(model, steps=1)
    assert torch.equal(model.model[0].bn.running_mean, before)
    model = make_model()
    apply_bitfit(model, bn_stats="update")
    train_steps(model, steps=1)
    assert not torch.equal(model.model[0].bn.running_mean, before)


def test_adapters_refuse_merge_clearly():
    model = make_model()
    apply_adapters(model, after=["neck"])
    with pytest.raises(ConfigError, match="cannot be merged"):
        merge_lora(model)


def test_apply_peft_by_name():
    assert list_peft_methods() == ["adapters", "bitfit", "dora", "full", "lora", "none", "qlora"]
    model = make_model()
    apply_peft(model, "lora", rank=4, targets=["neck"], adapter_name="kitchen")
    assert list_adapters(model) == ["kitchen"]
    model = make_model()
    apply_peft(model, "full")  # everything trains but ultralytics' fixed DFL decoder
    assert all(p.requires_grad == (".dfl." not in n) for n, p in model.named_parameters())
    with pytest.raises(UnknownMethodError, match="known methods: adapters, bitfit"):
        apply_peft(model, "lorax")
    with pytest.raises(ConfigError, match="unknown LoRAConfig setting"):
        apply_peft(model, "lora", rnak=4)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LoRAConfig(rank=0), "rank must be a positive integer"),
        (lambda: LoRAConfig(rank=-2), "rank must be a positive integer"),
        (lambda: LoRAConfig(alpha=0), "alpha must be > 0"),
        (lambda: LoRAConfig(alpha=-1.0), "alpha must be > 0"),
        (lambda: LoRAConfig(dropout=1.0), "dropout"),
        (lambda: LoRAConfig(oversize="explode"), "oversize must be one of"),
        (lambda: QLoRAConfig(bits=8), "bits=8 is not supported"),
        (lambda: AdapterConfig(reduction=0), "reduction must be a positive integer"),
        (lambda: LoRAConfig(bn_stats="sometimes"), "bn_stats must be one of"),
    ],
)
def test_bad_configs_raise(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_unknown_target_lists_valid_names():
    model = make_model()
    with pytest.raises(ConfigError, match=r"valid targets are a part \(backbone, neck, head\)"):
        apply_lora(model, rank=4, targets=["backbone", "model.99.conv"])
    with pytest.raises(ConfigError, match="has no parts"):
        apply_lora(MixedConvNet(), rank=2, targets=["backbone"])
    with pytest.raises(ConfigError, match="already has an adapter"):
        apply_lora(model, rank=2, targets=["neck"])
        apply_lora(model, rank=2, targets=["neck"])


def test_trainable_report_counts_every_parameter():
    model = make_model()
    total = sum(p.numel() for p in model.parameters())
    quiet(apply_qlora, model, rank=4, targets=["neck"])
    report = trainable_report(model)
    assert report.total.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert report.total.total == total + lora_params  # NF4 weights counted by their original size
    assert report.by_part["neck"].trainable == lora_params
    assert "| neck |" in report.table() and "base (NF4, frozen)" in report.table()


def test_lora_inside_a_block_that_carries_adapters():
    model = make_model()
    apply_adapters(model, after=[16], adapter_name="ad")
    apply_lora(model.neck, rank=2, targets=["model.16.cv1.conv"], adapter_name="lo")
    assert isinstance(model.model[16].base_layer.cv1.conv, LoRALayer)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.16.base_layer.cv1.conv.lora_A.lo.weight" in names and "model.16.adapter_up.ad.weight" in names
    train_steps(model, steps=1)
    assert torch.isfinite(predict(model)).all()
