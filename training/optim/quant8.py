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
  only shortens the step). Code ``0`` is never written; it decodes to zero (the
  padding of :class:`BlockLayout`).

Decoding is one table lookup per value (256 entries) and one multiply by the
block's scale; the round-trip error is bounded by :func:`relative_error_bound`;
everything is tensor arithmetic (no Python loops over elements).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

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


@functools.lru_cache(maxsize=None)
def _table(signed: bool, device: torch.device) -> torch.Tensor:
    """The value of every code as a fraction of its block's absmax, indexed by the code's byte (``uint8`` view)."""
    levels, log2_min = _grid(signed)
    byte = torch.arange(256, dtype=torch.int32)
    code = byte.to(torch.int8) if signed else byte.to(torch.uint8)  # the code each byte pattern stands for
    k = code.float()
    values = k.abs().neg_().add_(levels).mul_(log2_min / (levels - 1)).exp2_()  # level L -> 1
    values = values * torch.sign(k) if signed else torch.where(k == 0, 0.0, values)
    return values.to(device)


def encode_blocks(
    blocks: torch.Tensor,
    signed: bool,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (``blocks``' shape, int8 if ``signed`` else uint8) and per-row absmax of a ``(blocks, size)`` float tensor.

    The nearest level in log space is ``round(L + c·log2(|x| / absmax))`` with
    ``c = (L - 1) / -log2_min``, computed as ``trunc(c·log2|x| + (L + ½ - c·log2 absmax))``
    clamped to the code range: four passes over the values (log, multiply-add,
    clamp, cast), two more for the sign when signed, besides ``|x|`` and the block maximum. The block maximum
    itself lands on level ``L`` (decoded exactly); zeros give ``log2 0 = -inf``, code 0
    (signed) or 1 (unsigned).

    ``out``: ``(codes, absmax)`` tensors to write into. ``overwrite``: ``blocks`` is
    scratch (unsigned only: it is used as ``|x|`` and left holding garbage); otherwise
    it is left unchanged. The caller vouches that ``blocks`` is non-negative when not ``signed``.
    """
    levels, log2_min = _grid(signed)
    c = (levels - 1) / -log2_min
    mag = blocks if overwrite and not signed else blocks.abs()
    absmax = torch.amax(mag, dim=1, out=out[1]) if out is not None else mag.amax(dim=1)
    offset = absmax.clamp_min(torch.finfo(torch.float32).tiny).log2_().mul_(-c).add_(levels + 0.5)
    k = torch.add(offset[:, None], mag.log2_(), alpha=c, out=mag).clamp_min_(0 if signed else 1)
    if signed:
        k.mul_(blocks.sign())  # as copysign (k is 0 where blocks is), in two fast passes instead of one slow one
    if out is not None:
        return out[0].copy_(k), absmax  # the cast truncates: levels 0..L (k <= L + ½ up to rounding)
    return k.to(torch.int8 if signed else torch.uint8), absmax


def decode_blocks(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Float32 ``(blocks, size)`` values of :func:`encode_blocks`' output: a table lookup and one multiply."""
    table = _table(codes.dtype == torch.int8, codes.device)
    index = codes.reshape(-1).view(torch.uint8).to(torch.int32)
    return torch.index_select(table, 0, index).view(codes.shape).mul_(absmax[:, None])


class BlockLayout:
    """Tensors of the given shapes laid end to end, each zero-padded to whole blocks: ``(blocks, block_size)``.

    Every tensor starts a new block, so quantising the packed buffer gives each
    tensor the scales it would get on its own.
    """

    def __init__(self, shapes: list[torch.Size], block_size: int):
        self.shapes = [torch.Size(s) for s in shapes]
        self.block_size = block_size
        self.numels = [math.prod(s) for s in self.shapes]
        self.blocks = [math.ceil(n / block_size) for n in self.numels]  # blocks per tensor
        self.pads = [b * block_size - n for b, n in zip(self.blocks, self.numels)]

    def pack(self, tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """One ``(blocks, block_size)`` tensor holding ``tensors`` (cast to ``dtype``), padding zeros."""
        dtype = dtype or tensors[0].dtype
        zeros = torch.zeros(self.block_size, dtype=dtype, device=tensors[0].device)
        pieces = []
        for t, pad in zip(tensors, self.pads):
            pieces.append(t.reshape(-1))
            if pad:
                pieces.append(zeros[:pad])
        flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
        return flat.to(dtype).view(-1, self.block_size)

    def unpack(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``packed`` in the tensors' shapes (no copy)."""
        chunks = packed.reshape(-1).split([b * self.block_size for b in self.blocks])
        return [c[:n].view(s) for c, n, s in zip(chunks, self.numels, self.shapes)]

    def split_blocks(self, per_block: torch.Tensor) -> list[torch.Tensor]:
        """``per_block`` (one value per block, e.g. absmax) split into each tensor's part (views)."""
        return list(per_block.split(self.blocks))

    @functools.lru_cache(maxsize=4)
    def chunks(self, rows: int) -> list[tuple[slice, list[tuple[int, int, int, int]]]]:
        """The packed buffer in runs of ``rows`` blocks: ``(block rows, pieces)``.

        Each piece ``(tensor, start, stop, pad)`` is values ``start:stop`` of that tensor
        followed by ``pad`` zeros; the pieces of a chunk fill its rows in order.
        """
        out, pieces, row0, filled = [], [], 0, 0
        bs, size = self.block_size, rows * self.block_size
        for t, (n, b) in enumerate(zip(self.numels, self.blocks)):
            start = 0
            while start < b * bs:
                stop = min(b * bs, start + size - filled)
                pieces.append((t, min(start, n), min(stop, n), stop - max(start, n) if stop > n else 0))
                filled += stop - start
                start = stop
                if filled == size:
                    out.append((slice(row0, row0 + rows), pieces))
                    pieces, row0, filled = [], row0 + rows, 0
        if pieces:
            out.append((slice(row0, row0 + filled // bs), pieces))
        return out

    def piece_views(self, tensors: Sequence[torch.Tensor | None], pieces: list[tuple[int, int, int, int]]) -> list[torch.Tensor]:
        """Flat ``tensors[t][start:stop]`` of each piece (views of contiguous tensors, copies of others);
        ``tensors`` may hold None for tensors no piece refers to."""
        out = []
        for t, start, stop, _ in pieces:
            tensor = tensors[t]
            assert tensor is not None, f"piece of tensor {t}, which is None"
            flat = tensor.reshape(-1)
            out.append(flat if stop - start == self.numels[t] else flat[start:stop])
        return out

    def gather(self, tensors: list[torch.Tensor], pieces: list[tuple[int, int, int, int]]) -> torch.Tensor:
        """One chunk of the packed buffer (``(rows, block_size)``) from ``tensors``; a view when it is one tensor's run."""
        parts = []
        for (t, start, stop, pad), view in zip(pieces, self.piece_views(tensors, pieces)):
            parts.append(view)
            if pad:
                parts.append(view.new_zeros(pad))
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).view(-1, self.block_size)

    def split_chunk(self, chunk: torch.Tensor, pieces: list[tuple[int, int, int, int]]) -> list[torch.Tensor]:
        """The values of each piece in one chunk (flat views of ``chunk``, padding dropped)."""
        sizes = [n for _, start, stop, pad in pieces for n in (stop - start, pad)]
        return list(chunk.reshape(-1).split(sizes)[::2])


@functools.lru_cache(maxsize=64)
def block_layout(shapes: tuple[torch.Size, ...], block_size: int) -> BlockLayout:
    """A cached :class:`BlockLayout` (optimizers pack the same shapes every step)."""
    return BlockLayout(list(shapes), block_size)


def quantize_many(
    tensors: list[torch.Tensor], signed: bool = True, block_size: int = DEFAULT_BLOCK_SIZE
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Quantise each tensor (codes of its shape, int8 if ``signed`` else uint8, and per-block float32 absmax).

    All tensors are processed in one pass over their concatenation; the result is
    the same as quantising each on its own (every tensor starts a new block).
    """
    if not tensors:
        return []
    layout = BlockLayout([t.shape for t in tensors], block_size)
    blocks = layout.pack(tensors, torch.float32)
    if not signed and bool((blocks < 0).any()):
        raise ValueError("unsigned quantisation needs a non-negative tensor")
    codes, absmax = encode_blocks(blocks, signed)
    return [(c.clone(), a.clone()) for c, a in zip(layout.unpack(codes), layout.split_blocks(absmax))]


def dequantize_many(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], block_size: int = DEFAULT_BLOCK_SIZE
) -> list[torch.Tensor]:
    """Float32 tensors from :func:`quantize_many`'s ``(codes, absmax)`` pairs (one pass over all)."""
    if not pairs:
        return []
    layout = BlockLayout([c.shape for c, _ in pairs], block_size)
    out = decode_blocks(layout.pack([c for c, _ in pairs]), torch.cat([a for _, a in pairs]))
    return layout.unpack(out)


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
