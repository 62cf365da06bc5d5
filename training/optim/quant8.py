"""Blockwise 8-bit quantisation of optimizer moments, shared by COAP-8bit and AdamW8bit.

Each block of ``block_size`` consecutive values keeps one float32 absmax scale.
Inside a block, magnitudes ``|x| / absmax`` are coded on a logarithmic grid
(like a tiny floating-point format) so that both large and small moments keep a
bounded *relative* error:

* signed tensors (first moment) use ``int8``: code ``0`` is zero, codes
  ``±1..±127`` are magnitudes ``2**(SIGNED_LOG2_MIN * (127 - k) / 126)``;
  magnitudes below the smallest level round to zero (under-estimating a moment
  only shortens the step);
* non-negative tensors (second moment) use ``uint8``: codes ``1..255`` span
  ``2**UNSIGNED_LOG2_MIN .. 1``; nothing rounds to zero (over-estimating ``v``
  only shortens the step).

The round-trip error is bounded by :func:`relative_error_bound`; everything is
tensor arithmetic (no Python loops over elements).
"""

from __future__ import annotations

import math

import torch

SIGNED_LEVELS = 127
UNSIGNED_LEVELS = 255
SIGNED_LOG2_MIN = -20.0  # smallest non-zero signed magnitude: 2**-20 of the block absmax
UNSIGNED_LOG2_MIN = -32.0  # smallest non-zero unsigned magnitude: 2**-32 of the block absmax
DEFAULT_BLOCK_SIZE = 256


def _grid(signed: bool) -> tuple[int, float]:
    return (SIGNED_LEVELS, SIGNED_LOG2_MIN) if signed else (UNSIGNED_LEVELS, UNSIGNED_LOG2_MIN)


def relative_error_bound(signed: bool) -> float:
    """Largest relative round-trip error for magnitudes inside the coded range (half a log step)."""
    levels, log2_min = _grid(signed)
    return 2.0 ** (-log2_min / (2 * (levels - 1))) - 1.0


def smallest_level(signed: bool) -> float:
    """The smallest non-zero magnitude, as a fraction of the block absmax."""
    return 2.0 ** _grid(signed)[1]


def _padded(tensors: list[torch.Tensor], block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensors flattened, each zero-padded to whole blocks, concatenated: ``(blocks, block_size)``."""
    zeros = torch.zeros(block_size, dtype=dtype, device=tensors[0].device)
    pieces = []
    for t in tensors:
        pieces.append(t.reshape(-1).to(dtype))
        pad = (-t.numel()) % block_size
        if pad:
            pieces.append(zeros[:pad])
    return torch.cat(pieces).view(-1, block_size)


def _unpad(flat: torch.Tensor, shapes: list[torch.Size], block_size: int) -> list[torch.Tensor]:
    sizes = [math.ceil(math.prod(s) / block_size) * block_size for s in shapes]
    return [chunk[: math.prod(s)].view(s) for chunk, s in zip(flat.reshape(-1).split(sizes), shapes)]


def quantize_many(
    tensors: list[torch.Tensor], signed: bool = True, block_size: int = DEFAULT_BLOCK_SIZE
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Quantise each tensor (codes of its shape, int8 if ``signed`` else uint8, and per-block float32 absmax).

    All tensors are processed in one pass over their concatenation; the result is
    the same as quantising each on its own (every tensor starts a new block).
    """
    if not tensors:
        return []
    levels, log2_min = _grid(signed)
    blocks = _padded(tensors, block_size, torch.float32)
    if not signed and bool((blocks < 0).any()):
        raise ValueError("unsigned quantisation needs a non-negative tensor")
    mag = blocks.abs()
    absmax = mag.amax(dim=1)
    mag.div_(absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_min_(1e-45).log2_()
    # level k in 1..levels stands for 2**(log2_min * (levels - k) / (levels - 1)); rounding in log space
    k = mag.mul_(-(levels - 1) / log2_min).add_(levels).round_()
    if signed:
        codes = k.clamp_(0, levels).mul_(torch.sign(blocks)).to(torch.int8)
    else:  # a positive value never rounds to zero; exact zeros come back as 2**-32 of the absmax (or 0 if all zero)
        codes = k.clamp_(1, levels).to(torch.uint8)
    counts = [math.ceil(t.numel() / block_size) for t in tensors]
    shapes = [t.shape for t in tensors]
    return [(c.clone(), a.clone()) for c, a in zip(_unpad(codes, shapes, block_size), absmax.split(counts))]


def dequantize_many(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], block_size: int = DEFAULT_BLOCK_SIZE
) -> list[torch.Tensor]:
    """Float32 tensors from :func:`quantize_many`'s ``(codes, absmax)`` pairs (one pass over all)."""
    if not pairs:
        return []
    signed = pairs[0][0].dtype == torch.int8
    levels, log2_min = _grid(signed)
    k = _padded([c for c, _ in pairs], block_size, torch.float32)
    absmax = torch.cat([a for _, a in pairs])
    level = k.abs() if signed else k.clone()
    out = level.neg_().add_(levels).mul_(log2_min / (levels - 1)).exp2_().mul_(absmax[:, None])  # level L -> 1
    if signed:
        out.mul_(torch.sign(k))  # sign(0) = 0: code 0 is exactly zero
    return _unpad(out, [c.shape for c, _ in pairs], block_size)


def quantize_blockwise(
    x: torch.Tensor, signed: bool = True, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise one tensor: codes of ``x``'s shape (int8 if ``signed`` else uint8) and per-block absmax."""
    return quantize_many([x], signed, block_size)[0]


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE
) -> torch.Tensor:
    """Float32 tensor of ``codes``' shape from :func:`quantize_blockwise`'s output."""
    return dequantize_many([(codes, absmax)], block_size)[0]


def quantized_nbytes(numel: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes one quantised tensor of ``numel`` values takes: one byte per value plus a float32 per block."""
    return numel + 4 * math.ceil(numel / block_size)
