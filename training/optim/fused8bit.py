"""Adam on 8-bit moments in one pass per block, on the CPU (a numba kernel).

The torch path (:class:`training.optim.lowrank.PackedMoments`) runs each chunk
through ~25 elementwise ops; here every block of ``block_size`` values is
decoded, updated, re-encoded and its parameter (or update) written while it is
in the cache: one read of the gradient and the codes, one write of the codes
and the parameter. The coding is :mod:`training.optim.quant8`'s: its decode
tables and grid constants are passed in, so the grid has one definition.

Same semantics as :func:`quant8.encode_blocks` (absmax per block, nearest level
in log space, bound :func:`quant8.relative_error_bound`); the log2 here is a
series (below) rather than torch's, so a value within ~1e-6 of a rounding
boundary between two levels may take the neighbouring code (a few in 10⁵; the
tests bound it).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import njit

from training.optim.quant8 import _grid, _table

_F32 = np.float32
_TINY = _F32(np.finfo(np.float32).tiny)


@njit(cache=True, inline="always", error_model="numpy")
def _log2(x):  # pragma: no cover - compiled
    """log2 of a positive normal float32, vectorisable (libm's log2f is a scalar call).

    ``x = 2**e · f`` with ``f`` in [√½, √2); ``ln f = 2·atanh(s)``, ``s = (f−1)/(f+1)``,
    ``|s| ≤ 0.172``, summed to ``s⁹`` (the next term is below 4e-9): float32 rounding dominates.
    """
    bits = np.float32(x).view(np.int32)
    e = (bits >> 23) - 127
    f = np.int32((bits & 0x007FFFFF) | 0x3F800000).view(np.float32)  # the mantissa, in [1, 2)
    if f > _F32(1.4142135):
        f = f * _F32(0.5)
        e += 1
    s = (f - _F32(1.0)) / (f + _F32(1.0))
    s2 = s * s
    series = _F32(1.0) + s2 * (_F32(1 / 3) + s2 * (_F32(1 / 5) + s2 * (_F32(1 / 7) + s2 * _F32(1 / 9))))
    return _F32(e) + s * series * _F32(2 / math.log(2))


@njit(cache=True, inline="always", error_model="numpy")
def _level(magnitude, offset, c, lowest, levels):  # pragma: no cover - compiled
    """The code level ``trunc(c·log2|x| + offset)`` clamped to ``lowest..levels`` (zero / subnormal → ``lowest``)."""
    if magnitude < _TINY:
        return _F32(lowest)
    return min(max(offset + c * _log2(magnitude), _F32(lowest)), _F32(levels))


@njit(cache=True, error_model="numpy")
def _absmax(x):  # pragma: no cover - compiled
    """``max |x|`` of a float32 array: the largest bit pattern with the sign bit cleared (float32s
    of one sign order as their bits); LLVM vectorises an integer max, not a float one."""
    bits = x.view(np.int32)
    top = np.int32(0)
    for j in range(bits.size):
        top = max(top, bits[j] & np.int32(0x7FFFFFFF))
    return np.int32(top).view(np.float32)


# One loop per helper: LLVM vectorises each of these small loops, not one loop doing all of it.
@njit(cache=True, error_model="numpy")
def _decode(codes, table, scale, out):  # pragma: no cover - compiled
    as_bytes = codes.view(np.uint8)  # the table is indexed by the code's byte
    for j in range(out.size):
        out[j] = table[as_bytes[j]] * scale


@njit(cache=True, error_model="numpy")
def _moments(grad, m, v, w1, beta2, w2):  # pragma: no cover - compiled
    """Adam's moment update in place: ``m ← m + w1·(g − m)`` (torch's ``lerp_``), ``v ← β2·v + w2·g²``."""
    for j in range(grad.size):
        g = grad[j]
        m[j] = m[j] + w1 * (g - m[j])
        v[j] = v[j] * beta2 + w2 * g * g


@njit(cache=True, inline="always", error_model="numpy")
def _offset(top, grid):  # pragma: no cover - compiled
    """The block maximum lands on the top level: ``offset = levels + ½ − c·log2(absmax)``."""
    return _F32(grid[0] + 0.5) - _F32(grid[1]) * _log2(max(top, _TINY))


@njit(cache=True, error_model="numpy")
def _encode(x, codes, grid, signed):  # pragma: no cover - compiled
    """Codes of ``x`` on the log grid ``(levels, c)``; returns the absmax (:func:`quant8.encode_blocks`)."""
    levels, c = grid[0], _F32(grid[1])
    top = _absmax(x)
    offset = _offset(top, grid)
    if signed:
        for j in range(x.size):
            k = np.int32(_level(abs(x[j]), offset, c, 0, levels))
            codes[j] = -k if x[j] < 0 else k
    else:
        for j in range(x.size):
            codes[j] = np.int32(_level(x[j], offset, c, 1, levels))
    return top


@njit(cache=True, error_model="numpy")
def _step(m, v, target, step_size, bias_correction2, eps, decay, apply_to_target):  # pragma: no cover - compiled
    if apply_to_target:
        for j in range(m.size):
            target[j] = target[j] * decay + step_size * (m[j] / (np.sqrt(v[j]) / bias_correction2 + eps))
    else:
        for j in range(m.size):
            target[j] = step_size * (m[j] / (np.sqrt(v[j]) / bias_correction2 + eps))


@njit(cache=True, error_model="numpy")
def adam_8bit_blocks(
    grad, m_codes, m_absmax, v_codes, v_absmax, m_float, target,
    m_table, v_table, m_grid, v_grid, block_size,
    beta1, beta2, eps, bias_correction2, step_size, decay, apply_to_target,
):  # fmt: skip  # pragma: no cover - compiled
    """One Adam step on one tensor's 8-bit moments, block by block, in place.

    ``grad`` (float32), ``m_codes`` (int8), ``v_codes`` (uint8), ``target`` (float32) are flat
    and of one length; ``*_absmax`` hold one scale per block (the last block may be short).
    ``m_float``, when not empty, is the float first moment to start from (a projection
    move decoded and transferred it) instead of ``m_codes``. ``*_table``: code byte → value
    as a fraction of the absmax; ``*_grid``: ``(levels, c)`` of the log grid.
    ``apply_to_target``: ``target ← decay·target + step_size·m/(√v̂+eps)`` (the parameter),
    else ``target ← step_size·m/(√v̂+eps)`` (the update, for the caller to apply).
    """
    w1, beta2, w2 = _F32(1.0 - beta1), _F32(beta2), _F32(1.0 - beta2)
    eps, bias_correction2, step_size, decay = _F32(eps), _F32(bias_correction2), _F32(step_size), _F32(decay)
    m_block = np.empty(block_size, np.float32)  # one block's moments in float32, in the cache
    v_block = np.empty(block_size, np.float32)
    for lo in range(0, grad.size, block_size):
        hi = min(lo + block_size, grad.size)  # the last block may be short
        b = lo // block_size
        m, v = m_block[: hi - lo], v_block[: hi - lo]
        if m_float.size:
            m[:] = m_float[lo:hi]
        else:
            _decode(m_codes[lo:hi], m_table, m_absmax[b], m)
        _decode(v_codes[lo:hi], v_table, v_absmax[b], v)
        _moments(grad[lo:hi], m, v, w1, beta2, w2)
        m_absmax[b] = _encode(m, m_codes[lo:hi], m_grid, True)
        v_absmax[b] = _encode(v, v_codes[lo:hi], v_grid, False)
        _step(m, v, target[lo:hi], step_size, bias_correction2, eps, decay, apply_to_target)


# The channels-last kernel's helpers: as _decode, _absmax and _encode, each value's block looked up.
@njit(cache=True, error_model="numpy")
def _decode_at(codes, table, scales, block, out):  # pragma: no cover - compiled
    as_bytes = codes.view(np.uint8)
    for j in range(out.size):
        out[j] = table[as_bytes[j]] * scales[block[j]]


@njit(cache=True, error_model="numpy")
def _absmax_at(x, where):  # pragma: no cover - compiled
    bits = x.view(np.int32)
    top = np.int32(0)
    for j in range(where.size):
        top = max(top, bits[where[j]] & np.int32(0x7FFFFFFF))
    return np.int32(top).view(np.float32)


@njit(cache=True, error_model="numpy")
def _encode_at(x, codes, offsets, block, scratch, grid, signed):  # pragma: no cover - compiled
    levels, c = grid[0], _F32(grid[1])
    for j in range(x.size):  # each value's offset first: a lookup inside the loop below stops its vectorisation
        scratch[j] = offsets[block[j]]
    if signed:
        for j in range(x.size):
            k = np.int32(_level(abs(x[j]), scratch[j], c, 0, levels))
            codes[j] = -k if x[j] < 0 else k
    else:
        for j in range(x.size):
            codes[j] = np.int32(_level(x[j], scratch[j], c, 1, levels))


@njit(cache=True, error_model="numpy")
def adam_8bit_permuted(
    grad, m_codes, m_absmax, v_codes, v_absmax, target, block_of, position_of,
    m_table, v_table, m_grid, v_grid, block_size,
    beta1, beta2, eps, bias_correction2, step_size, decay,
):  # fmt: skip  # pragma: no cover - compiled
    """:func:`adam_8bit_blocks` (``apply_to_target``, no float first moment) for a tensor stored in another
    order than its logical one (channels-last), its blocks still taken in logical order.

    ``grad``, the codes and ``target`` are flat in the tensor's memory order. The tensor is
    walked in units of ``block_of.size`` values, each a whole number of blocks and of
    output channels (whose values a channels-last tensor keeps together, only reordered):
    ``block_of[j]`` is the block (counted from the unit's first) of the value at position
    ``j`` of a unit, ``position_of[l]`` the position of the unit's ``l``-th value in logical
    order. Every value meets the arithmetic of :func:`adam_8bit_blocks`, and every block's
    absmax is the maximum over the same values, so codes, scales and parameters are bit
    for bit those of the same tensor stored row-major.
    """
    w1, beta2, w2 = _F32(1.0 - beta1), _F32(beta2), _F32(1.0 - beta2)
    eps, bias_correction2, step_size, decay = _F32(eps), _F32(bias_correction2), _F32(step_size), _F32(decay)
    unit = block_of.size
    m_unit, v_unit, scratch = np.empty(unit, np.float32), np.empty(unit, np.float32), np.empty(unit, np.float32)
    blocks = (unit + block_size - 1) // block_size
    m_off, v_off = np.empty(blocks, np.float32), np.empty(blocks, np.float32)
    for lo in range(0, grad.size, unit):
        size = min(unit, grad.size - lo)  # the last unit may hold fewer output channels
        b0, block = lo // block_size, block_of[:size]
        m, v = m_unit[:size], v_unit[:size]
        _decode_at(m_codes[lo : lo + size], m_table, m_absmax[b0:], block, m)
        _decode_at(v_codes[lo : lo + size], v_table, v_absmax[b0:], block, v)
        _moments(grad[lo : lo + size], m, v, w1, beta2, w2)
        for b in range((size + block_size - 1) // block_size):
            where = position_of[b * block_size : min((b + 1) * block_size, size)]
            m_absmax[b0 + b], v_absmax[b0 + b] = _absmax_at(m, where), _absmax_at(v, where)
            m_off[b], v_off[b] = _offset(m_absmax[b0 + b], m_grid), _offset(v_absmax[b0 + b], v_grid)
        _encode_at(m, m_codes[lo : lo + size], m_off, block, scratch[:size], m_grid, True)
        _encode_at(v, v_codes[lo : lo + size], v_off, block, scratch[:size], v_grid, False)
        _step(m, v, target[lo : lo + size], step_size, bias_correction2, eps, decay, True)


@functools.lru_cache(maxsize=256)
def block_map(shape: tuple[int, ...], strides: tuple[int, ...], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`adam_8bit_permuted`'s ``block_of`` and ``position_of`` for a dense tensor whose first dimension is
    outermost in memory (channels-last): one unit of whole blocks and whole output channels (or the whole tensor)."""
    channel = math.prod(shape[1:])
    assert strides[0] == channel, "each output channel's values must lie together"
    unit = min(math.lcm(channel, block_size), math.prod(shape))
    logical = np.arange(unit)
    # unsigned: numba then indexes without the check for negative indices, which blocks vectorisation
    position_of = np.zeros(unit, np.uint32)
    for index, stride in zip(np.unravel_index(logical, shape), strides):
        position_of += (index * stride).astype(np.uint32)
    block_of = np.empty(unit, np.uint32)
    block_of[position_of] = logical // block_size
    return block_of, position_of


@functools.lru_cache(maxsize=None)
def coding() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's view of quant8's grid: decode tables (signed, unsigned) and ``(levels, c)`` of each."""
    grids = []
    for signed in (True, False):
        levels, log2_min = _grid(signed)
        grids.append(np.array([levels, (levels - 1) / -log2_min], dtype=np.float64))
    return _table(True, torch.device("cpu")).numpy(), _table(False, torch.device("cpu")).numpy(), grids[0], grids[1]


_EMPTY = np.empty(0, np.float32)


def _memory(t: torch.Tensor) -> np.ndarray:
    """A dense tensor's values as they lie in memory (flat, no copy)."""
    return t.as_strided((t.numel(),), (1,)).numpy()


def adam_8bit_(
    state: dict, grad: torch.Tensor, target: torch.Tensor, m_float: torch.Tensor | None, block_size: int,
    beta1: float, beta2: float, eps: float, step: int, step_size: float, decay: float, apply_to_target: bool,
) -> None:  # fmt: skip
    """Adam on ``state``'s 8-bit moments with ``grad`` (CPU tensors; codes and scales updated in place).

    ``target`` (contiguous float32 of ``grad``'s size): the parameter, updated as
    ``decay·p + step_size·m̂/(√v̂+eps)`` when ``apply_to_target``, else overwritten with the update.
    A channels-last parameter (``apply_to_target``, no ``m_float``) is updated in its memory order,
    its gradient and codes sharing its strides (:func:`adam_8bit_permuted`).
    """
    m_table, v_table, m_grid, v_grid = coding()
    if not target.is_contiguous():
        assert apply_to_target and m_float is None and grad.stride() == target.stride() == state["exp_avg"].stride()
        adam_8bit_permuted(
            _memory(grad), _memory(state["exp_avg"]), state["exp_avg_absmax"].numpy(),
            _memory(state["exp_avg_sq"]), state["exp_avg_sq_absmax"].numpy(), _memory(target),
            *block_map(tuple(target.shape), target.stride(), block_size), m_table, v_table, m_grid, v_grid, block_size,
            beta1, beta2, eps, math.sqrt(1 - beta2**step), step_size, decay,
        )  # fmt: skip
        return
    adam_8bit_blocks(
        grad.contiguous().view(-1).numpy(),
        state["exp_avg"].view(-1).numpy(), state["exp_avg_absmax"].numpy(),
        state["exp_avg_sq"].view(-1).numpy(), state["exp_avg_sq_absmax"].numpy(),
        _EMPTY if m_float is None else m_float.contiguous().view(-1).numpy(),
        target.view(-1).numpy(), m_table, v_table, m_grid, v_grid, block_size,
        beta1, beta2, eps, math.sqrt(1 - beta2**step), step_size, decay, apply_to_target,
    )  # fmt: skip
