"""Entry point for one or many processes.

    python -m training.train --config kitchen.yaml
    torchrun --nproc_per_node 2 -m training.train --config kitchen.yaml

Under torchrun (``WORLD_SIZE`` > 1) it joins the process group (NCCL on CUDA,
gloo on CPU) and runs :func:`training.recipe.train` with DistributedDataParallel;
rank 0 writes metrics and checkpoints. Any ``TrainConfig`` field can be given as
``--set key=value`` (YAML value syntax) on top of the file.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")


def parse_overrides(pairs: list[str]) -> dict:
    import yaml

    from models.errors import ConfigError

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description="fine-tune a detector (torchrun-ready)")
    parser.add_argument("--config", help="TrainConfig YAML / JSON file")
    parser.add_argument("--resume", help="continue the run in this directory")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from models.errors import ConfigError, GlassesVisionError
    from training.config import TrainConfig
    from training.recipe import train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    try:
        values = TrainConfig.from_file(args.config).to_dict() if args.config else {}
        values.update(parse_overrides(args.set))
        if args.resume:
            values["resume"] = args.resume
        if args.quiet:
            values["quiet"] = True
        if not values.get("data") and not values.get("resume"):
            raise ConfigError("give --config FILE (with data: ...) or --resume RUN_DIR")
        result = train(TrainConfig.from_dict(values))
        if result.status == "completed" and (not dist.is_initialized() or dist.get_rank() == 0):
            m = result.metrics
            print(f"done: {result.steps} steps, val mAP50 {m.get('map50', 0):.4f}, mAP50-95 {m.get('map50_95', 0):.4f}; "
                  f"outputs in {result.run_dir}")
        return 0
    except GlassesVisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
