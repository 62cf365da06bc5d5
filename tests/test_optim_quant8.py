"""The blockwise 8-bit quantiser shared by COAP-8bit and AdamW8bit."""

from __future__ import annotations

import pytest
import torch

from training.optim.quant8 import (
    dequantize_blockwise,
    dequantize_many,
    quantize_blockwise,
    quantize_many,
    quantized_nbytes,
    relative_error_bound,
    smallest_level,
)


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


def test_block_layout_chunks_cover_every_value_once():
    from training.optim.quant8 import BlockLayout

    layout = BlockLayout([(5,), (300,), (2, 256), (1000,), (3, 3)], 64)
    tensors = [torch.randn(s) for s in layout.shapes]
    packed = layout.pack(tensors)
    assert packed.shape == (sum(layout.blocks), 64) and (packed.reshape(-1)[5:64] == 0).all()
    for rows in (1, 2, 3, 7, 100):
        chunks = layout.chunks(rows)
        assert torch.equal(torch.cat([layout.gather(tensors, pieces) for _, pieces in chunks]), packed)
        out = [torch.zeros(s) for s in layout.shapes]
        for rows_slice, pieces in chunks:
            torch._foreach_copy_(layout.piece_views(out, pieces), layout.split_chunk(packed[rows_slice], pieces))
        assert all(torch.equal(a, b) for a, b in zip(out, tensors))


@pytest.mark.parametrize("signed", [True, False])
def test_encode_into_buffers_and_decode_table(signed):
    from training.optim.quant8 import decode_blocks, encode_blocks

    x = _wide_range(64 * 8, signed).view(8, 64)
    codes, absmax = encode_blocks(x, signed)
    out = (torch.empty_like(codes), torch.empty(8))
    scratch = x.clone()
    got = encode_blocks(scratch, signed, out=out, overwrite=True)
    assert got[0] is out[0] and torch.equal(out[0], codes) and torch.equal(out[1], absmax)
    if signed:
        assert torch.equal(scratch, x)  # overwrite only ever applies to unsigned input
    # every level of the grid (one block, absmax 1) encodes to its own code and decodes back
    levels, log2_min = (127, -20.0) if signed else (255, -32.0)
    k = torch.arange(-127 if signed else 1, levels + 1, dtype=torch.float32)
    level = torch.exp2((levels - k.abs()) * (log2_min / (levels - 1))) * torch.sign(k)
    grid = torch.cat([level, torch.zeros(256 - k.numel())]).view(1, 256)
    back, a = encode_blocks(grid, signed)
    assert a.tolist() == [1.0] and torch.equal(back[0, : k.numel()].float(), k)
    torch.testing.assert_close(decode_blocks(back, a)[0, : k.numel()], level, rtol=1e-6, atol=0)
