"""Recipe test helpers: a generated dataset and a tiny config (YOLO11n at 64 px), one gloo rank's body."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from training.config import TrainConfig


@functools.lru_cache(maxsize=None)
def tiny_dataset(n: int = 20, imgsz: int = 64, domain: str = "source", seed: int = 0) -> Path:
    """A generated dataset (16 train / 4 val frames by default), made once per test process."""
    from training.data.synthetic import generate_dataset

    root = Path(tempfile.mkdtemp(prefix="gv-recipe-"))
    return generate_dataset(root / domain, domain, n=n, imgsz=imgsz, seed=seed, val_fraction=0.2)


def tiny_config(out: str | Path, **changes) -> TrainConfig:
    """YOLO11n from scratch at 64 px, batch 4, no evaluation during training, quiet."""
    values = dict(data=str(tiny_dataset()), base="yolo11n", imgsz=64, batch=4, epochs=1, quiet=True, eval_every=0,
                  save_every=100, log_every=1, eval_batch=8, out=str(out), lr=2e-3, warmup_fraction=0.2)
    values.update(changes)
    return TrainConfig(**values)


def ddp_worker(rank: int, world: int, config: dict, init_file: str, results) -> None:
    """One process of a gloo run (started with torch.multiprocessing spawn)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from training.recipe import train

        result = train(TrainConfig(**config))
        if rank == 0:
            results.put(result.losses)
    finally:
        dist.destroy_process_group()


def run_on_gloo_processes(target, payload, tmp_path: Path, world: int = 2):
    """Run ``target(rank, world, payload, init_file, results)`` on ``world`` spawned processes (each joins a gloo
    group through ``init_file``); every process must exit cleanly. Returns what rank 0 put on ``results``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    init = tempfile.mktemp(prefix="gv-ddp-", dir=tmp_path)
    procs = [ctx.Process(target=target, args=(rank, world, payload, init, results)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0] * world
    return results.get()
