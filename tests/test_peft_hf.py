"""Adapter files and HF PEFT, both ways: PeftModel.from_pretrained reads what save_adapter writes, load_adapter
reads what HF PEFT saves, and files in this library's first format still load."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.errors import CheckpointError
from service.layers.peft import (
    apply_bitfit,
    apply_dora,
    apply_lora,
    list_adapters,
    load_adapter,
    merge_lora,
    read_adapter_config,
    save_adapter,
)
from tests.helpers.models import make_model
from tests.helpers.peft import images, logits, predict, quiet, train_steps

peft = pytest.importorskip("peft", reason="HF PEFT is a dev dependency (pip install -e '.[dev]')")

TOL = 1e-5  # max |diff| <= TOL * max |y|
X = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(7))


def base_model() -> torch.nn.Module:
    """YOLO11n with BatchNorm statistics from real forward passes (a fresh model's eval output is nearly constant)."""
    model = make_model()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(images(4, 128, seed=2))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model.eval()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    """Boxes (pixels) and class scores (sigmoid) each within ``tol`` of their own scale."""
    return _close(a[:, :4], b[:, :4], tol) and _close(a[:, 4:], b[:, 4:], tol)


def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded eval outputs (BatchNorm running statistics count) and raw train-mode head outputs."""
    return predict(model, X), logits(model, X)


def same_outputs(a, b, train_mode: bool = True, tol: float = TOL) -> bool:
    """``train_mode=False`` for bn_stats="freeze", a training-time hook HF PEFT has no notion of."""
    return close(a[0], b[0], tol) and (not train_mode or _close(a[1], b[1], tol))


def hf_load(directory):
    """HF PEFT's own loader on a fresh base model (it warns that it ignores our glasses_vision field)."""
    base = base_model()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*glasses_vision.*")
        peft_model = peft.PeftModel.from_pretrained(base, str(directory))
    return peft_model


@pytest.mark.parametrize(
    "apply",
    [
        lambda m: apply_lora(m, rank=8, alpha=16, targets=["backbone", "neck"]),  # max_share shrinks small layers
        lambda m: apply_lora(m, rank=4, use_rslora=True, targets=["neck"], bn_stats="freeze"),
        lambda m: apply_dora(m, rank=4, targets=["model.2", "model.16", "head"]),
        lambda m: (apply_lora(m.backbone, rank=4), apply_bitfit(m, train_class_branch=True)),
    ],
    ids=["lora-rank-pattern", "rslora-frozen-bn", "dora", "lora+bitfit+class-branch"],
)
def test_hf_peft_loads_what_we_save(apply, tmp_path):
    model = base_model()
    quiet(apply, model)
    train_steps(model, steps=2)  # BatchNorm statistics move (bn_stats="update")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # and every trained tensor moves clearly (a fresh model's gradients are tiny)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    ours = outputs(model)
    assert not close(predict(base_model(), X), ours[0])  # training moved the outputs: equality below means something
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "yolo11n"
    assert set(config["glasses_vision"]) >= {"method", "bn_stats", "config", "trainable"}
    peft_model = hf_load(tmp_path / "a")
    assert peft_model.peft_config["default"].r == config["r"]
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if ".lora_A.default." in n)
    assert n_lora == len(config["target_modules"])
    assert same_outputs(outputs(peft_model), ours, train_mode=config["glasses_vision"]["bn_stats"] == "update")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_we_load_what_hf_peft_saves(use_dora, tmp_path):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    targets = ["model.3.conv", "model.6.cv1.conv", "model.16.cv2.conv", "model.23.cv2.0.0.conv"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={"model.3.conv": 2},
                        alpha_pattern={"cv2.0.0.conv": 3.0}, use_dora=use_dora,
                        modules_to_save=["model.0.bn", "model.23.cv3.0.2"])
    peft_model = get_peft_model(base_model(), config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained adapter: nonzero B, moved magnitudes, new BN statistics and class predictor
        for n, p in peft_model.named_parameters():
            if ".lora_B." in n or "lora_magnitude" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        bn = peft_model.base_model.model.model[0].bn.modules_to_save["default"]
        bn.running_mean.add_(0.1)
        bn.running_var.mul_(1.5)
    expected = outputs(peft_model)
    assert not close(predict(base_model(), X), expected[0])
    # PeftModel.save_pretrained writes these two files (plus a model card, which needs a transformers config)
    peft_model.peft_config["default"].save_pretrained(str(tmp_path / "hf"))
    save_file(get_peft_model_state_dict(peft_model), str(tmp_path / "hf" / "adapter_model.safetensors"))

    desc = read_adapter_config(tmp_path / "hf")
    assert desc["source"] == "hf-peft" and desc["method"] == ("dora" if use_dora else "lora")
    assert {k: v["rank"] for k, v in desc["modules"].items()} == {t: 2 if t == "model.3.conv" else 4 for t in targets}
    assert desc["modules"]["model.23.cv2.0.0.conv"]["alpha"] == 3.0 and desc["modules"]["model.3.conv"]["alpha"] == 8.0
    model = base_model()
    assert load_adapter(model, tmp_path / "hf") == "default" and list_adapters(model) == ["default"]
    assert same_outputs(outputs(model), expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.0.bn.weight" in trainable and "model.23.cv3.0.2.bias" in trainable  # PEFT trains modules_to_save
    merge_lora(model)  # W + dW rounds differently from Wx + dWx: up to ~1.2e-4 of the scores' scale here
    assert same_outputs(outputs(model), expected, tol=5e-4)


def test_unsupported_hf_peft_files_are_refused(tmp_path):
    model = base_model()
    apply_lora(model, rank=2, targets=["model.5.conv"])
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["glasses_vision"]
    path.write_text(json.dumps({**config, "layers_to_transform": [5]}))
    with pytest.raises(CheckpointError, match="layers_to_transform"):
        load_adapter(base_model(), tmp_path / "a")
    path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="neither a glasses-vision adapter nor an HF PEFT LoRA"):
        load_adapter(base_model(), tmp_path / "a")
    path.write_text(json.dumps({**config, "rank_pattern": {}, "r": 3}))
    with pytest.raises(CheckpointError, match="rank 3 in the HF PEFT config, rank 2 in its tensors"):
        load_adapter(base_model(), tmp_path / "a")


def _write_first_format(model, directory, tensors_from):
    """An adapter directory as this library's first format wrote it (canonical keys, settings under ``config``)."""
    desc = json.loads((tensors_from / "adapter_config.json").read_text())["glasses_vision"]
    tensors = {}
    for key, t in load_file(str(tensors_from / "adapter_model.safetensors")).items():
        key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if key.endswith(".lora_magnitude_vector"):
            key, t = key.removesuffix("_vector"), t.flatten()
        owner, _, local = key.rpartition(".")
        bn_stat = local in ("running_mean", "running_var", "num_batches_tracked")
        if ".lora_" in key or key in desc["trainable"] or bn_stat:
            tensors[key] = t
    modules = {k: {"kind": "lora", "quantized": False, **{f: v[f] for f in ("rank", "alpha", "use_dora")}}
               for k, v in desc["modules"].items()}
    directory.mkdir()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "glasses-vision/adapter"})
    (directory / "adapter_config.json").write_text(json.dumps({
        "format": "glasses-vision/adapter", "version": 1, "adapter_name": desc["adapter_name"],
        "peft_type": desc["method"], "config": desc["config"], "bitfit": desc["methods"].get("bitfit"),
        "modules": modules, "trainable": desc["trainable"], "bn_stats": desc["bn_stats"],
        "bn_stats_saved": desc["bn_stats_saved"], "base_model": desc["base_model"],
    }))


@pytest.mark.parametrize("apply", [
    lambda m: (apply_lora(m.backbone, rank=4, adapter_name="kitchen"), apply_bitfit(m)),
    lambda m: apply_dora(m, rank=4, targets=["neck"], bn_stats="freeze"),
], ids=["lora+bitfit", "dora"])
def test_first_format_adapters_still_load(apply, tmp_path):
    model = base_model()
    quiet(apply, model)
    train_steps(model, steps=1)
    save_adapter(model, tmp_path / "new")
    _write_first_format(model, tmp_path / "old", tmp_path / "new")
    assert read_adapter_config(tmp_path / "old")["source"] == "glasses-vision/adapter v1"
    fresh = base_model()
    quiet(load_adapter, fresh, tmp_path / "old")
    assert torch.equal(predict(fresh, X), predict(model, X))
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad)
