"""Two gloo processes under DDP with COAP: every rank ends with the same projections and weights."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from tests.helpers.models import TinyNet
    from tests.helpers.optim import tiny_batch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from training.optim import COAPAdamW

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DDP(TinyNet())
        opt = COAPAdamW(model.parameters(), rank=2, min_numel=0, update_interval=2, reproject_factor=2)
        for i in range(5):
            x, y = tiny_batch(seed=10 * i + rank)  # each rank sees different data
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()  # DDP averages the gradients
            opt.step()
        flat = torch.cat(
            [v.float().reshape(-1) for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
            + [p.detach().reshape(-1) for p in model.parameters()]
        )
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        with open(os.path.join(out_dir, f"rank{rank}"), "w") as fh:
            fh.write(str(bool(torch.equal(gathered[0], gathered[1]))))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_ranks_compute_identical_projections(tmp_path):
    # fork: the children inherit the imported modules, which keeps this test at a few seconds
    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:  # never let a stuck worker hang the suite
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two DDP workers did not finish within 60 s")
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["True", "True"]
