"""The four packages pass mypy with the settings in pyproject.toml's ``[tool.mypy]`` (run in-process, as CI runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "training", "export", "service")


def _mypy(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[str, int]:
    """mypy's report and exit status, run from the repository root with the project's config."""
    monkeypatch.chdir(ROOT)  # the config's ``files`` and the cache folder are relative to it
    stdout, stderr, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), *args])
    return stdout + stderr, status


@pytest.mark.slow
def test_packages_type_check(monkeypatch):
    report, status = _mypy(monkeypatch)
    assert status == 0, f"mypy found errors (run `mypy` in the repository root to see them):\n{report}"
    n_files = sum(1 for pkg in PACKAGES for _ in (ROOT / pkg).rglob("*.py"))
    assert f"no issues found in {n_files} source files" in report, report  # every module was checked


def test_the_config_checks_the_bodies_of_unannotated_functions(monkeypatch, tmp_path):
    # the service glue is mostly unannotated helpers: a misspelt field there must still be an error
    glue = tmp_path / "glue.py"
    glue.write_text(
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class Result:\n"
        "    steps: int\n"
        "def glue(result: Result):\n"
        "    return result.global_step\n"
        "def untyped(x):\n"
        "    n: int = 'three'\n"
    )
    report, status = _mypy(monkeypatch, str(glue))  # files named here replace the config's
    assert status == 1, report
    assert '"Result" has no attribute "global_step"' in report, report
    assert "Incompatible types in assignment" in report, report
