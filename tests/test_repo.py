"""Repository promises: CI runs exactly the README's test command; the runtime ships without torch."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from models import DetectionModel
from service.layers.peft import apply_bitfit, apply_lora, has_peft_layers

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", text, flags=re.S)


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    main_job = [c for c in commands if c.rstrip().endswith("glasses-vision demo")]
    tests = [c for c in commands if "pytest" in c]
    assert main_job and tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests[0].strip() in ci


def test_readme_python_example_runs_as_written(tmp_path, capsys):
    """The first Python block of the README (the PEFT seed example) runs unchanged."""
    text = (ROOT / "README.md").read_text()
    block = re.findall(r"```python\n(.+?)\n```", text, flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    model = namespace["model"]
    assert not has_peft_layers(model)  # merged back to plain layers
    plain = DetectionModel(nc=80)
    assert model.state_dict().keys() == plain.state_dict().keys()  # no adapter tensor left behind
    model.save(tmp_path / "merged")
    reloaded = DetectionModel.load(tmp_path / "merged")
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())

    # the printed table counts what the example made trainable: LoRA in the backbone + every bias
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("| **total** |"))
    n_params, n_trainable = (int(c.strip().replace(",", "")) for c in total.strip("|").split("|")[1:3])
    apply_lora(plain.backbone, rank=8)
    apply_bitfit(plain)
    assert n_trainable == sum(p.numel() for p in plain.parameters() if p.requires_grad) > 0
    assert n_params == sum(p.numel() for p in plain.parameters())
    backbone = next(line for line in out.splitlines() if line.startswith("| backbone |"))
    neck = next(line for line in out.splitlines() if line.startswith("| neck |"))
    assert int(backbone.split("|")[3].strip().replace(",", "")) > int(neck.split("|")[3].strip().replace(",", "")) > 0
