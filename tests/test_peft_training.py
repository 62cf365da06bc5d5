"""PEFT under bf16 autocast, gradient checkpointing and DistributedDataParallel (1-process gloo)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

from service.layers.peft import apply_bitfit, apply_dora, apply_lora, apply_qlora
from tests.helpers.models import make_model
from tests.helpers.peft import images, loss_fn, quiet


@pytest.mark.parametrize("apply", [
    lambda m: apply_lora(m, rank=4, targets=["backbone", "neck"]),
    lambda m: apply_dora(m, rank=4, targets=["neck"]),
    lambda m: apply_qlora(m, rank=4, targets=["neck"]),
], ids=["lora", "dora", "qlora"])
def test_bf16_autocast_forward_backward(apply):
    model = make_model()
    quiet(apply, model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model(images(2, 64)))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = make_model()
        quiet(apply_lora, model, rank=4, targets=["backbone", "neck"], dropout=0.1)
        apply_bitfit(model, bn_stats="freeze")
        if ckpt:
            model.set_gradient_checkpointing(("backbone", "neck"))
        model.train()
        torch.manual_seed(3)
        loss_fn(model(images(2, 64))).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_has_no_unused_parameters():
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = make_model()
        quiet(apply_lora, model, rank=4, targets=["neck"], adapter_name="a")
        quiet(apply_lora, model, rank=2, targets=["backbone"], adapter_name="b")
        from service.layers.peft import set_adapter

        set_adapter(model, "a")  # "b" stays in the model, frozen and unused
        apply_bitfit(model, train_class_branch=True)
        ddp = DDP(model, find_unused_parameters=False)
        ddp.train()
        for step in range(2):  # the second step fails if a trainable parameter got no gradient
            ddp.zero_grad()
            loss_fn(ddp(images(2, 64, seed=step))).backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
