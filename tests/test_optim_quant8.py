"""The blockwise 8-bit quantiser shared by COAP-8bit and AdamW8bit."""

from __future__ import annotations

import pytest
import torch
from optim_fixtures import single_thread  # noqa: F401

from training.optim.quant8 import (
    dequantize_blockwise,
    dequantize_many,
    quantize_blockwise,
    quantize_many,
    quantized_nbytes,
    relative_error_bound,
    smallest_level,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _wide_range(n: int, signed: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.empty(n).uniform_(-18, 0, generator=g))  # magnitudes over ~8 decades
    if signed:
        x = x * torch.sign(torch.randn(n, generator=g))
    x[::97] = 0.0
    return x


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_is_bounded(signed):
    bs = 64
    x = _wide_range(1000, signed)  # not a multiple of the block size: the last block is partial
    codes, absmax = quantize_blockwise(x, signed=signed, block_size=bs)
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.shape == x.shape
    assert absmax.shape == (16,) and absmax.dtype == torch.float32
    y = dequantize_blockwise(codes, absmax, block_size=bs)
    scale = absmax.repeat_interleave(bs)[: x.numel()]
    rel = relative_error_bound(signed)
    floor = smallest_level(signed) * scale
    inside = x.abs() >= floor
    err = (y - x).abs()
    assert (err[inside] <= rel * x.abs()[inside] * (1 + 1e-5) + 1e-30).all()
    # below the smallest level: signed rounds to zero or the smallest level, unsigned up to the smallest level
    assert (err[~inside] <= 1.1 * floor[~inside]).all()
    assert rel < 0.06  # ~5.6% signed, ~4.5% unsigned (2.2% on sqrt(v))
    nz = (x != 0) & (y != 0)
    assert torch.equal(torch.sign(y[nz]), torch.sign(x[nz]))  # never flips a sign
    assert (y[inside] != 0).all()
    assert (y[x == 0] == 0).all() if signed else (y[x == 0] <= floor[x == 0]).all()


def test_block_maximum_is_exact_and_all_zero_block_stays_zero():
    x = torch.tensor([0.5, -2.0, 1e-3, 0.0] + [0.0] * 4)
    codes, absmax = quantize_blockwise(x, block_size=4)
    y = dequantize_blockwise(codes, absmax, block_size=4)
    assert y[1] == -2.0 and absmax.tolist() == [2.0, 0.0]
    assert (y[4:] == 0).all()
    v = torch.zeros(5)
    assert (dequantize_blockwise(*quantize_blockwise(v, signed=False), ) == 0).all()


def test_many_equals_one_at_a_time():
    xs = [torch.randn(3, 5), torch.randn(300), torch.randn(2, 2, 3, 3)]
    together = quantize_many(xs, signed=True, block_size=32)
    for x, (c, a) in zip(xs, together):
        c1, a1 = quantize_blockwise(x, signed=True, block_size=32)
        assert torch.equal(c, c1) and torch.equal(a, a1)
    back = dequantize_many(together, block_size=32)
    for x, (c, a), y in zip(xs, together, back):
        torch.testing.assert_close(y, dequantize_blockwise(c, a, block_size=32), rtol=1e-6, atol=0)
        assert y.shape == x.shape


def test_unsigned_refuses_negative_and_bytes_formula():
    with pytest.raises(ValueError):
        quantize_blockwise(torch.tensor([-1.0, 1.0]), signed=False)
    codes, absmax = quantize_blockwise(torch.randn(1000), block_size=256)
    assert codes.numel() * codes.element_size() + absmax.numel() * 4 == quantized_nbytes(1000, 256)
