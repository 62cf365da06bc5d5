"""``glasses-vision train``: fine-tune a detector on a dataset (see docs/TRAINING.md).

    glasses-vision train --data data.yaml --base glasses-base-yolo11n --peft lora --rank 8 \\
        --optimizer coap --grad-checkpoint --accumulate 4 --amp bf16 --epochs 10 --imgsz 320 --batch 16 --out runs/kitchen
    glasses-vision train --config kitchen.yaml          # a TrainConfig file; flags given override it
    glasses-vision train --resume runs/kitchen          # continue from runs/kitchen/checkpoints/last
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    from training.settings import CHECKPOINT_POLICIES

    add = parser.add_argument
    add("--config", help="a TrainConfig YAML / JSON file; the flags below override its values")
    add("--data", help="YOLO data.yaml or COCO json")
    add("--base", help="base model: glasses-base-yolo11n (default), a model directory, or yolo11n..yolov8x (from scratch)")
    add("--new-classes", action="store_true", default=None, help="the dataset's classes differ from the base's: train a new class predictor")
    add("--peft", help="none or full (full fine-tuning, default; --set 'peft_settings={targets: [head]}' trains only "
                       "those parts) or a PEFT method (lora, dora, bitfit, qlora)")
    add("--rank", type=int, help="adapter rank (default 8)")
    add("--alpha", type=float, help="LoRA alpha")
    add("--optimizer", help="adamw (default), coap, coap8bit, galore, adamw8bit")
    add("--in-backward", action="store_true", default=None, help="step each parameter inside backward (no accumulation, no clipping)")
    add("--lr", type=float, help="peak learning rate (default 1e-3)")
    add("--weight-decay", type=float, help="decoupled weight decay (default 5e-4)")
    add("--epochs", type=int, help="passes over the training set (default 10)")
    add("--max-steps", type=int, help="stop after this many optimizer steps")
    add("--batch", type=int, help="images per micro-batch per process (default 16)")
    add("--accumulate", type=int, help="micro-batches per optimizer step (default 1)")
    add("--imgsz", type=int, help="input size, a multiple of 32 (default 320)")
    add("--grad-checkpoint", nargs="?", const="backbone,neck", default=None, metavar="PARTS",
        help="activation checkpointing for these parts (default when given: backbone,neck)")
    add("--grad-checkpoint-policy", choices=CHECKPOINT_POLICIES,
        help="checkpoint all layers of those parts (default) or only the high-resolution ones (stride <= 8)")
    add("--amp", choices=["none", "bf16"], help="autocast precision (default none)")
    add("--grad-clip", type=float, help="global gradient-norm clip (default 10; 0 = off)")
    add("--ema", action="store_true", default=None, help="keep an EMA of the weights and ship it")
    add("--no-augment", dest="augment", action="store_false", default=None, help="turn train-time augmentation off")
    add("--mosaic", type=float, metavar="P", help="chance of a 2x2 mosaic training sample (augment_settings.mosaic)")
    add("--replay", metavar="SOURCE_YAML", help="mix the train frames of this source dataset into every step (no forgetting)")
    add("--replay-fraction", type=float, metavar="F", help="share of each step's images taken from --replay (e.g. 0.25)")
    add("--eval-every", type=int, help="evaluate every N epochs (default 1; 0 = only at the end)")
    add("--save-every", type=int, help="checkpoint every N steps (default 50)")
    add("--memory-limit-mb", type=float, help="refuse a micro-batch whose exact bytes exceed this")
    add("--workers", type=int, help="DataLoader workers (default 0)")
    add("--seed", type=int, help="seed (default 0)")
    add("--device", choices=["auto", "cpu", "cuda"], help="device (default auto)")
    add("--out", help="run directory (default runs/train); a folder holding an earlier run is refused unless "
                      "--resume (continue it) or --overwrite (replace it)")
    add("--overwrite", action="store_true", help="replace an earlier run in --out (refused without it)")
    add("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint with its own settings; "
                                            "--max-steps / --epochs / reporting flags may change, others are refused")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="set any TrainConfig field (YAML value)")
    add("--quiet", action="store_true", default=None, help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace):
    """The TrainConfig the flags (and ``--config``) describe. ``--resume RUN_DIR`` without ``--config`` starts from the
    run's own ``config.yaml``, so that a flag that differs from it applies or is refused by name (never ignored)."""
    from training.config import TrainConfig
    from training.recipe import resumed_run_values
    from training.train import parse_overrides

    if args.config:
        values = TrainConfig.from_file(args.config).to_dict()
    elif args.resume:
        values = resumed_run_values(args.resume)
    else:
        values = {}
    values.update({k: getattr(args, k) for k in TrainConfig.field_names() if getattr(args, k, None) is not None})
    if args.mosaic is not None:
        values["augment_settings"] = {**values.get("augment_settings", {}), "mosaic": args.mosaic}
    values.update(parse_overrides(args.set))
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    from models.errors import ConfigError
    from training.recipe import check_out_folder, train

    config = config_from_args(args)
    if not config.data and not config.resume:
        raise ConfigError("give --data DATA_YAML (or --config FILE, or --resume RUN_DIR)")
    check_out_folder(config, args.overwrite)
    result = train(config)
    m = result.metrics
    if result.status == "completed":
        print(f"done in {result.wall_time_s:.0f} s: {result.steps} steps, val mAP50 {m.get('map50', 0):.4f}, "
              f"mAP50-95 {m.get('map50_95', 0):.4f}, trainable {result.trainable.get('percent', 0):.2f}%")
    else:
        print(f"stopped at step {result.steps}/{result.total_steps}; resume with: glasses-vision train --resume {result.run_dir}")
    print(f"outputs: {result.run_dir}")
    return 0
