"""Repository promises: CI runs exactly the README's test command; the runtime ships without torch."""

from __future__ import annotations

import re
from pathlib import Path

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
