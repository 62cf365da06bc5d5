"""AdamW with blockwise 8-bit moments (the quantiser of :mod:`training.optim.quant8`, shared with COAP-8bit)."""

from __future__ import annotations

from training.optim.lowrank import ProjectedAdamW
from training.optim.quant8 import DEFAULT_BLOCK_SIZE


class AdamW8bit(ProjectedAdamW):
    """``torch.optim.AdamW`` semantics, first moment int8 and second moment uint8, one float32 absmax per block.

    Example:
        >>> opt = AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.01)
    """

    projected = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, eight_bit=True, block_size=block_size
        )
