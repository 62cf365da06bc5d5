"""Repository promises: CI runs exactly the README's test command; the runtime ships without torch."""

from __future__ import annotations

import re
from pathlib import Path

from service.layers.peft import has_peft_layers

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
    model.save(tmp_path / "merged")
    assert "trainable" in capsys.readouterr().out.lower()
