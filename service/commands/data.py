"""``glasses-vision data``: generate synthetic datasets, check datasets, convert YOLO to COCO."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

EPILOG = """examples:
  glasses-vision data synth --domain source --n 2000 --imgsz 160 --seed 0 --out data/source
  glasses-vision data synth --domain egocentric --n 300 --out data/ego --hands 1.5 --jpeg 0
  glasses-vision data check data/ego/data.yaml
  glasses-vision data to-coco data/ego/data.yaml --split val --out data/ego/val.json
"""


def add_parser(sub, name: str, help_text: str) -> None:
    from training.data.synthetic.generator import DOMAINS, MAX_STRENGTH, Effects

    parser = sub.add_parser(name, help=help_text, description=help_text + ".", epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="data_command", title="data commands", metavar="ACTION")

    synth = actions.add_parser(
        "synth", help="render a synthetic YOLO dataset (images/, labels/, data.yaml)",
        description="Render a synthetic YOLO dataset. 'source' is a clean third-person view; 'egocentric' adds the "
        "glasses camera's effects, each with a strength (0 = off, 1 = egocentric default, up to "
        f"{MAX_STRENGTH:g}) that the options below override.",
    )
    synth.add_argument("--domain", choices=DOMAINS, default="source", help="which domain to render (default: source)")
    synth.add_argument("--n", type=int, default=200, help="number of images (default: 200)")
    synth.add_argument("--imgsz", type=int, default=160, help="square image side in pixels (default: 160)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files (default: 0)")
    synth.add_argument("--val-fraction", type=float, default=0.2, help="share of images in the val split (default: 0.2)")
    synth.add_argument("--format", choices=("png", "jpg"), default="png", help="image file format (default: png, lossless)")
    synth.add_argument("--out", required=True, help="output folder (must be empty or new)")
    synth.add_argument("--overwrite", action="store_true",
                       help="replace an existing output folder (one generated with the same arguments is reused as it is)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    effects = synth.add_argument_group("effect strengths")
    for effect in Effects.names():
        effects.add_argument(f"--{effect.replace('_', '-')}", dest=f"effect_{effect}", type=float, metavar="S",
                             help=f"strength of '{effect}'")
    synth.set_defaults(func=run_synth)

    check = actions.add_parser("check", help="count images, labels and problems of a data.yaml or COCO json",
                               description="Read every image and label of a dataset, list what is wrong (file and "
                               "line) and print counts per split and class. Exits 1 when any problem was found.")
    check.add_argument("data", help="data.yaml (YOLO) or a COCO .json")
    check.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to check (default: train val)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=run_check)

    coco = actions.add_parser("to-coco", help="write one split of a YOLO dataset as COCO json",
                              description="Write the labels of one split as a COCO detection json (category ids 1..nc).")
    coco.add_argument("data", help="data.yaml")
    coco.add_argument("--split", default="val", help="split to convert (default: val)")
    coco.add_argument("--out", required=True, help="output .json path")
    coco.set_defaults(func=run_to_coco)

    parser.set_defaults(func=lambda args: (parser.print_help(), 1)[1])


def run_synth(args) -> int:
    from training.data.synthetic import generate_dataset
    from training.data.synthetic.generator import Effects

    overrides = {e: getattr(args, f"effect_{e}") for e in Effects.names() if getattr(args, f"effect_{e}") is not None}
    start = time.perf_counter()
    data = generate_dataset(args.out, args.domain, n=args.n, imgsz=args.imgsz, seed=args.seed,
                            val_fraction=args.val_fraction, image_format=args.format, overwrite=args.overwrite,
                            progress=not args.quiet, **overrides)
    seconds = time.perf_counter() - start
    print(f"{args.n} {args.domain} images ({args.imgsz}px) ready in {data.parent} after {seconds:.1f}s; "
          f"dataset file: {data}")
    return 0


def run_check(args) -> int:
    from pathlib import Path

    from models.errors import DataError
    from training.data import build_dataset

    report: dict[str, dict[str, Any]] = {}
    problems = 0
    splits = [None] if Path(args.data).suffix.lower() == ".json" else args.splits
    for split in splits:
        name = split or "json"
        try:
            ds = build_dataset(args.data, split=split or "train", imgsz=32, strict=False)
        except DataError as exc:
            report[name] = {"error": str(exc)}
            problems += 1
            continue
        report[name] = ds.summary()
        problems += len(ds.problems)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, r in report.items():
            if "error" in r:
                print(f"[{name}] error: {r['error']}")
                continue
            per_class = ", ".join(f"{k}={v}" for k, v in r["per_class"].items())
            print(f"[{name}] images={r['images']} boxes={r['boxes']} background={r['background_images']} "
                  f"skipped={r['skipped']} problems={len(r['problems'])}")
            print(f"[{name}] per class: {per_class}")
            for p in r["problems"]:
                print(f"[{name}] problem: {p}")
    print("ok" if problems == 0 else f"{problems} problem(s) found")
    return 0 if problems == 0 else 1


def run_to_coco(args) -> int:
    from training.data import build_dataset
    from training.data.coco import write_coco

    ds = build_dataset(args.data, split=args.split, imgsz=32)
    out = write_coco(ds, args.out)
    print(f"wrote {len(ds)} images, {ds.summary()['boxes']} boxes of split '{args.split}' to {out}")
    return 0
