"""The glasses-vision command line: help, subcommands, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.cli import COMMANDS, build_parser, main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("data", "train", "eval", "export", "serve", "demo"):
        assert name in text


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert len(capsys.readouterr().out.splitlines()) > 3


def test_every_subcommand_is_registered():
    parser = build_parser()
    registered = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse offers no public accessor
    assert registered == set(COMMANDS)


def test_errors_are_one_line_without_traceback(tmp_path):
    missing = tmp_path / "nowhere" / "data.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "eval", "--data", str(missing), "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_help_does_not_import_torch():
    """Building the parser stays light: every heavy import happens when a command runs."""
    code = "import sys; from service.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
