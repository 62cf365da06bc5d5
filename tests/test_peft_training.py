"""PEFT under bf16 autocast, gradient checkpointing and DistributedDataParallel (1-process gloo)."""

from __future__ import annotations

import copy
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
    """bf16 autocast gives the fp32 loss and gradients within bf16 rounding, and leaves the weights fp32."""
    model = make_model()
    quiet(apply, model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move adapters off their init (LoRA B = 0 would give A no gradient to compare)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    results = []
    for bf16 in (False, True):
        m = copy.deepcopy(model).train()
        # BatchNorm on running statistics: in train mode at 64 px, batch 2, the deepest BN layers normalise 8 values
        # and cancel the gradient of a mean loss to rounding noise, in fp32 as in bf16 (measured: cosine ~0 even
        # without PEFT), which would make any comparison meaningless.
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(m(images(2, 64)))
        loss.backward()
        grads = [p.grad for p in m.parameters() if p.requires_grad]
        assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        assert all(p.dtype == torch.float32 for p in m.parameters())
        results.append((loss.item(), torch.cat([gr.flatten().double() for gr in grads])))
    (loss32, grad32), (loss16, grad16) = results
    assert loss16 == pytest.approx(loss32, rel=1e-3)  # measured 3e-5
    assert float((grad16 - grad32).norm() / grad32.norm()) < 0.05  # measured 0.009-0.011


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
