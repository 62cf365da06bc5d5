"""``glasses-vision eval``: mAP50, mAP50-95, per-class AP and precision / recall of a model on a dataset.

    glasses-vision eval --data data.yaml --model runs/kitchen          # a run dir (its merged/), a model dir,
    glasses-vision eval --data data.yaml --model glasses-base-yolo11n  # or a model name
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="YOLO data.yaml or COCO json")
    parser.add_argument("--model", default="glasses-base-yolo11n", help="run dir, model dir or model name (default: the shipped base)")
    parser.add_argument("--split", default="val", help="dataset split (default val)")
    parser.add_argument("--imgsz", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--plot", default=None, help="write the precision-recall curve PNG here")
    parser.add_argument("--json", dest="json_out", default=None, help="write the metrics as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def load_model(spec: str):
    """A run directory (its ``merged/``), a model directory, or a registry name."""
    from pathlib import Path

    from models.errors import NotFoundError
    from models.registry import create_model

    path = Path(spec)
    if (path / "merged" / "config.json").is_file():
        path = path / "merged"
    if path.exists() and not (path / "config.json").is_file():
        raise NotFoundError(f"{spec} is neither a run directory (with merged/) nor a model directory (with config.json)")
    return create_model(str(path) if path.exists() else spec)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.errors import ConfigError
    from models.io import atomic_write_json
    from training.evaluate import evaluate, format_metrics

    if not Path(args.data).exists():
        raise ConfigError(f"dataset {args.data} does not exist; pass a YOLO data.yaml or a COCO json")
    model = load_model(args.model)
    metrics = evaluate(model, args.data, split=args.split, imgsz=args.imgsz or model.imgsz, batch=args.batch,
                       plot_path=args.plot, quiet=args.quiet)
    print(format_metrics(metrics))
    if args.json_out:
        atomic_write_json(args.json_out, metrics)
    return 0
