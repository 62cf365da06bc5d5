"""The ``glasses-vision`` command line.

Each subcommand lives in ``service/commands/<name>.py`` and provides
``add_parser(subparsers)`` and ``run(args) -> int``. Errors of the project's own
types print one line and exit 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "data": "generate and check datasets",
    "train": "fine-tune a detector on a dataset",
    "eval": "measure mAP of a model on a dataset",
    "export": "export a model or run to ONNX for the glasses runtime (or to an ultralytics .pt)",
    "serve": "start the HTTP service",
    "demo": "the main job: generate data, fine-tune, evaluate, export",
    "import": "import an ultralytics .pt checkpoint as a model directory",
    "predict": "detect objects in images, folders, globs or videos; write annotated copies and predictions.jsonl",
}
#: Subcommands whose module name differs from the command (``import`` is a Python keyword).
MODULES = {"import": "import_ultralytics"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glasses-vision",
        description="Adapt YOLO detectors to smart-glasses footage: fine-tune (LoRA/DoRA/BitFit/QLoRA + COAP), "
        "export to ONNX, serve over HTTP.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        try:
            module_name = f"service.commands.{MODULES.get(name, name)}"
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_parser(sub, name, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 1
    from models.errors import GlassesVisionError

    try:
        return int(args.func(args) or 0)
    except GlassesVisionError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
