"""4-bit NormalFloat (NF4) storage of frozen weights, as in QLoRA (Dettmers et al., 2023).

Weights are cut into blocks of ``blocksize`` values; each block is divided by its
absolute maximum and every value is stored as the index (4 bits, two per byte)
of the nearest of 16 NF4 levels. The levels are quantiles of a standard normal
distribution, built here the way the paper defines them. Double quantisation
stores the per-block scales themselves as int8 with one float32 scale per 256
blocks (linear int8 here, where the paper uses 8-bit floats).
"""

from __future__ import annotations

import torch
from torch import nn

from models.errors import ConfigError


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], with an exact zero (8 positive, 7 negative quantiles)."""
    offset = 0.9677083  # (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, the paper's choice
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


NF4_LEVELS = nf4_levels()
#: Worst-case rounding error of a value in a block, as a fraction of the block's absmax.
NF4_MAX_REL_ERROR = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2)


class NF4Weight(nn.Module):
    """A frozen weight stored as NF4 codes plus per-block scales; ``dequantize()`` gives it back in float32.

    Args:
        weight: the float tensor to store.
        blocksize: values per absmax block (even).
        double_quant: store the block scales as int8 with a float32 scale per ``scale_blocksize`` blocks.
    """

    # buffers, registered in __init__ (``absmax`` without double quantisation, the other three with it)
    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_q: torch.Tensor
    absmax_scale: torch.Tensor
    absmax_offset: torch.Tensor

    def __init__(self, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True, scale_blocksize: int = 256):
        super().__init__()
        if blocksize <= 0 or blocksize % 2:
            raise ConfigError(f"NF4 blocksize must be a positive even number, got {blocksize}")
        self.shape = tuple(weight.shape)
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        self.scale_blocksize = int(scale_blocksize)
        codes, absmax = quantize_nf4(weight.detach().float(), blocksize)
        self.register_buffer("packed", (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8).flatten())
        if double_quant:
            q, scale, offset = _quantize_scales(absmax, scale_blocksize)
            self.register_buffer("absmax_q", q)
            self.register_buffer("absmax_scale", scale)
            self.register_buffer("absmax_offset", offset)
        else:
            self.register_buffer("absmax", absmax)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def storage_bytes(self) -> int:
        """Bytes actually held: codes plus scales."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def block_absmax(self) -> torch.Tensor:
        if self.double_quant:
            n = self.absmax_q.numel()
            scale = self.absmax_scale.repeat_interleave(self.scale_blocksize)[:n]
            return self.absmax_q.float() * scale + self.absmax_offset
        return self.absmax

    def dequantize(self) -> torch.Tensor:
        codes = torch.stack([self.packed >> 4, self.packed & 0xF], dim=1).view(-1, self.blocksize).long()
        values = NF4_LEVELS.to(self.packed.device)[codes] * self.block_absmax().unsqueeze(1)
        return values.flatten()[: self.numel].view(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, blocksize={self.blocksize}, double_quant={self.double_quant}"


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes (blocks, blocksize) int, absmax (blocks,) float32)`` of a float tensor (zero-padded to whole blocks)."""
    flat = weight.flatten().float()
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    levels = NF4_LEVELS.to(flat.device)
    mids = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(normed, mids)
    return codes, absmax


def _quantize_scales(absmax: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    offset = absmax.mean()
    centred = absmax - offset
    pad = (-centred.numel()) % blocksize
    padded = torch.cat([centred, centred.new_zeros(pad)]) if pad else centred
    groups = padded.view(-1, blocksize)
    scale = (groups.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(groups / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8).flatten()[: absmax.numel()]
    return q, scale.float(), offset.float().reshape(())
