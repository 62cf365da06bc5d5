"""NF4 storage: the levels, bounded dequantisation error, <= 0.3x fp32 bytes, merge back to float."""

from __future__ import annotations

import pytest
import torch

from service.layers.peft import NF4Weight, QLoRAConfig, QLoRALayer, apply_qlora, merge_lora, quantized_bytes
from service.layers.tuners.nf4 import NF4_LEVELS, NF4_MAX_REL_ERROR
from tests.helpers.models import make_model
from tests.helpers.peft import predict, quiet, rel_diff


def test_nf4_levels_are_the_papers_normal_quantiles():
    assert NF4_LEVELS.numel() == 16 and NF4_LEVELS[0] == -1 and NF4_LEVELS[-1] == 1
    assert (NF4_LEVELS == 0).sum() == 1 and bool((NF4_LEVELS[1:] > NF4_LEVELS[:-1]).all())
    # published NF4 values (QLoRA appendix E)
    assert NF4_LEVELS[1].item() == pytest.approx(-0.6962, abs=1e-3)
    assert NF4_LEVELS[-2].item() == pytest.approx(0.7230, abs=1e-3)
    assert NF4_LEVELS[8].item() == pytest.approx(0.0796, abs=1e-3)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantisation_error_is_bounded(double_quant):
    w = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.05
    q = NF4Weight(w, blocksize=64, double_quant=double_quant)
    back = q.dequantize()
    assert back.shape == w.shape and back.dtype == torch.float32
    blocks = w.flatten().view(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    err = (back.flatten().view(-1, 64) - blocks).abs()
    # a code is at most half a level gap off; int8-stored block scales add their own rounding
    scale_err = (q.block_absmax().unsqueeze(1) - absmax).abs()
    assert bool((err <= NF4_MAX_REL_ERROR * absmax + scale_err + 1e-7).all())
    if double_quant:
        assert float(scale_err.max()) <= float((absmax - absmax.mean()).abs().max()) / 254 + 1e-7
    else:
        assert float(scale_err.max()) == 0.0
    assert float(err.mean() / w.abs().mean()) < 0.12
    # values exactly on a level (times the block absmax) round-trip exactly without double quantisation
    exact = NF4_LEVELS.repeat(4).view(1, 64) * 0.5
    if not double_quant:
        assert torch.equal(NF4Weight(exact, double_quant=False).dequantize(), exact)


def test_quantised_base_is_under_three_tenths_of_fp32_and_merges_to_float(tmp_path):
    model = make_model()
    base_keys = {k: v.shape for k, v in model.state_dict().items()}
    x = torch.rand(1, 3, 128, 128)
    quiet(apply_qlora, model, QLoRAConfig(rank=16, double_quant=True))
    stored, fp32 = quantized_bytes(model)
    assert fp32 > 0 and stored <= 0.3 * fp32
    quantised = [m for m in model.modules() if isinstance(m, QLoRALayer) and m.nf4 is not None]
    assert quantised and all("weight" not in m.base_layer._parameters for m in quantised)
    out = predict(model, x)
    merge_lora(model)
    assert not any(isinstance(m, NF4Weight) for m in model.modules())
    assert {k: v.shape for k, v in model.state_dict().items()} == base_keys
    assert rel_diff(predict(model, x), out) <= 1e-5


def test_qlora_output_is_close_to_float_base():
    model = make_model()
    x = torch.rand(1, 3, 128, 128)
    ref = predict(model, x)
    quiet(apply_qlora, model, rank=4, targets=["backbone"])
    # the head's sigmoid scores and pixel boxes move a little with 4-bit weights, not a lot
    assert rel_diff(predict(model, x), ref) < 0.1
