"""``glasses-vision import``: turn an ultralytics ``.pt`` checkpoint into a safetensors model directory."""

from __future__ import annotations

import argparse


def add_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=help_text,
        description="Import an ultralytics checkpoint (yolo11n.pt, yolov8s.pt, your own best.pt) as a model "
        "directory (config.json + model.safetensors) that train, eval, export and serve accept. A .pt file is a "
        "pickle: loading it runs code from the file, so --trust-pickle is required.",
        epilog="example:\n  glasses-vision import runs/detect/train/weights/best.pt --out models/shelf --trust-pickle\n"
        "  glasses-vision train --base models/shelf --data shelf/data.yaml --peft lora --out runs/shelf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="the ultralytics .pt file")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--imgsz", type=int, default=None, help="default input size (default: the checkpoint's train imgsz)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow unpickling the file (it executes code from it)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from models import DetectionModel

    model = DetectionModel.from_ultralytics(args.checkpoint, trusted=args.trust_pickle, imgsz=args.imgsz)
    out = model.save(args.out)
    print(f"imported {args.checkpoint}: {model.nc} classes, imgsz {model.imgsz} -> {out}")
    return 0
