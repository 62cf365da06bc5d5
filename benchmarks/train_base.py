"""Train the shipped base detector (``models/weights/base/``) with the project's own recipe.

YOLO11n, full fine-tuning from random weights (nothing can be downloaded), on the
generated clean "third-person" ``source`` domain; then measured on the source val
split and, zero-shot, on a generated egocentric val set. ``--install`` copies the
best checkpoint (by source-val mAP50-95) into ``models/weights/base/`` and writes
``card.json`` with the exact command, the seed and the measured numbers.

    python benchmarks/train_base.py --out runs/base --install --quiet   # the defaults are the shipped model's settings
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/base", help="run directory (data goes to <out>-data)")
    p.add_argument("--n", type=int, default=1000, help="generated source frames (20%% become val)")
    p.add_argument("--n-egocentric", type=int, default=250, help="generated egocentric frames for the zero-shot check")
    p.add_argument("--imgsz", type=int, default=128, help="frame size and network input size")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=450)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--mosaic", type=float, default=0.0, help="chance of a 2x2 mosaic sample (AugmentConfig.mosaic)")
    p.add_argument("--ema-tau", type=float, default=100.0, help="EMA ramp time constant in steps")
    p.add_argument("--install", action="store_true", help="copy the result into models/weights/base/ with its card")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from models.detection import DetectionModel
    from training.config import TrainConfig
    from training.data.synthetic import CLASS_NAMES, generate_dataset
    from training.evaluate import evaluate
    from training.recipe import train

    out = Path(args.out)
    data_root = Path(f"{args.out}-data")
    t0 = time.perf_counter()
    source = generate_dataset(data_root / "source", "source", n=args.n, imgsz=args.imgsz, seed=args.seed,
                              val_fraction=0.2, overwrite=True, progress=not args.quiet)
    ego = generate_dataset(data_root / "egocentric", "egocentric", n=args.n_egocentric, imgsz=args.imgsz,
                           seed=args.seed + 1, val_fraction=0.8, overwrite=True, progress=not args.quiet)
    gen_s = time.perf_counter() - t0
    config = TrainConfig(
        data=str(source), base="yolo11n", imgsz=args.imgsz, epochs=args.epochs, max_steps=args.max_steps,
        batch=args.batch, lr=args.lr, weight_decay=5e-4, warmup_fraction=0.05, ema=True, ema_tau=args.ema_tau,
        augment=True, augment_settings={"mosaic": args.mosaic} if args.mosaic else {}, eval_every=args.eval_every, save_every=50, seed=args.seed, out=str(out), quiet=args.quiet,
        eval_batch=32,
    )
    result = train(config)
    model = DetectionModel.load(out / "best") if (out / "best").is_dir() else DetectionModel.load(out / "merged")
    src = evaluate(model, source, split="val", imgsz=args.imgsz, batch=32, quiet=args.quiet)
    zero = evaluate(model, ego, split="val", imgsz=args.imgsz, batch=32, quiet=args.quiet)
    command = "python benchmarks/train_base.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    card = {
        "name": "glasses-base-yolo11n",
        "architecture": "yolo11n",
        "classes": list(CLASS_NAMES),
        "imgsz": args.imgsz,
        "command": command.strip(),
        "seed": args.seed,
        "recipe": {k: v for k, v in config.to_dict().items() if k not in ("out", "data", "quiet", "resume")},
        "data": {"generator": "training.data.synthetic.generate_dataset",
                 "source": {"domain": "source", "n": args.n, "imgsz": args.imgsz, "seed": args.seed, "val_fraction": 0.2},
                 "egocentric_val": {"domain": "egocentric", "n": args.n_egocentric, "imgsz": args.imgsz,
                                    "seed": args.seed + 1, "val_fraction": 0.8}},
        "metrics": {
            "source_val_map50": round(src["map50"], 4),
            "source_val_map50_95": round(src["map50_95"], 4),
            "source_val_images": src["images"],
            "egocentric_val_map50_zero_shot": round(zero["map50"], 4),
            "egocentric_val_map50_95_zero_shot": round(zero["map50_95"], 4),
            "egocentric_val_images": zero["images"],
            "per_class_source_ap50_95": {k: round(v["ap50_95"], 4) for k, v in src["per_class"].items()},
        },
        "training": {"steps": result.steps, "wall_time_s": round(result.wall_time_s, 1),
                     "data_generation_s": round(gen_s, 1), "torch_threads": args.threads,
                     "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                     "torch": torch.__version__, "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "trainable_parameters": result.trainable.get("trainable")},
    }
    print(json.dumps(card["metrics"], indent=2))
    from models.io import atomic_write_json

    atomic_write_json(out / "card.json", card)
    if args.install:
        from models.registry import BASE_MODEL_DIR

        BASE_MODEL_DIR.mkdir(parents=True, exist_ok=True)
        src_dir = out / "best" if (out / "best").is_dir() else out / "merged"
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(src_dir / name, BASE_MODEL_DIR / f".{name}.tmp")
            os.replace(BASE_MODEL_DIR / f".{name}.tmp", BASE_MODEL_DIR / name)
        atomic_write_json(BASE_MODEL_DIR / "card.json", card)
        print(f"installed into {BASE_MODEL_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
