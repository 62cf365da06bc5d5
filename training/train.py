"""Entry point for one or many processes.

    python -m training.train --config kitchen.yaml
    torchrun --nproc_per_node 2 -m training.train --config kitchen.yaml

Under torchrun (``WORLD_SIZE`` > 1) it joins the process group (NCCL on CUDA,
gloo on CPU) and runs :func:`training.recipe.train` with DistributedDataParallel;
rank 0 writes metrics and checkpoints. Any ``TrainConfig`` field can be given as
``--set key=value`` (YAML value syntax) on top of the file.

``--resume RUN_DIR`` alone continues with the run's own ``config.yaml``; ``--set`` on top of it may change
how long it trains (``max_steps``, ``epochs``) and how it reports, saves and loads; a setting that would change
what an optimizer step does is refused with its name (see ``training.recipe.RESUME_MAY_CHANGE``). A run that
does not resume refuses an ``out`` folder that holds an earlier run, unless ``--overwrite`` (it then starts the
folder over: the earlier run's checkpoints and outputs there are removed).
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
    parser = argparse.ArgumentParser(
        prog="python -m training.train", description="fine-tune a detector (torchrun-ready)",
        epilog="A run without --resume refuses an out folder that holds an earlier run unless --overwrite (which "
               "removes that run's checkpoints and outputs). --resume RUN_DIR alone takes the run's config.yaml; --set may change max_steps, "
               "epochs and the reporting settings, and anything that changes an optimizer step is refused.")
    parser.add_argument("--config", help="TrainConfig YAML / JSON file")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint (with its config.yaml unless --config)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in the out folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from models.errors import ConfigError, GlassesVisionError
    from training.config import TrainConfig
    from training.recipe import check_out_folder, resumed_run_values, train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    try:
        if args.config:
            values = TrainConfig.from_file(args.config).to_dict()
        elif args.resume:  # the run's own settings: a --set that differs then applies or is refused, never ignored
            values = resumed_run_values(args.resume)
        else:
            values = {}
        values.update(parse_overrides(args.set))
        if args.resume:
            values["resume"] = args.resume
        if args.quiet:
            values["quiet"] = True
        if not values.get("data") and not values.get("resume"):
            raise ConfigError("give --config FILE (with data: ...) or --resume RUN_DIR")
        config = TrainConfig.from_dict(values)
        check_out_folder(config, args.overwrite)
        result = train(config)
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
