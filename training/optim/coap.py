"""COAP: AdamW with correlation-aware low-rank gradient projection (Xiao et al., CVPR 2025, arXiv:2412.00071).

Written from the description in DESIGN.md ("COAP, the way this project
implements it"). Per projected parameter, every ``update_interval`` steps the
projection takes one clipped gradient step (size ``proj_lr``) on
``err(G PᵀP, G) · (1 − mean cos(M P, G))``; every
``update_interval × reproject_factor`` steps it is recomputed by a randomised SVD
of the current gradient, warm-started from the previous projection. k×k
convolutions use Tucker-2 factors on the channel modes.
"""

from __future__ import annotations

from typing import Any

from training.optim import projection as proj
from training.optim.lowrank import TINY_NUMEL, ProjectedAdamW
from training.optim.quant8 import DEFAULT_BLOCK_SIZE


class COAPAdamW(ProjectedAdamW):
    """AdamW with COAP's low-rank moments.

    Args:
        params: parameters or parameter groups (every setting below may be set per group).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay on the full weight).
        rank: fixed rank for every projected tensor (capped by its dimensions); ``None`` uses the ratios.
        rank_ratio_matrix: matrix rank = shorter side / ratio (>= 1).
        rank_ratio_cnn: Tucker rank of each channel mode = its size / sqrt(ratio) (>= 1), so the
            core holds about 1/ratio of the kernel.
        update_interval: steps between correlation-aware projection updates (``T_u``).
        reproject_factor: every ``T_u × reproject_factor`` steps the projection is recomputed by a
            warm-started randomised SVD instead.
        eight_bit: keep the moments blockwise int8 with one absmax scale per block.
        scale: multiplies the step of projected parameters (1.0 keeps AdamW's step size).
        min_numel: tensors this small, and 1-D tensors, take plain AdamW.
        proj_lr: size of the projection's correlation-aware gradient step (~0.1).
        block_size: values per absmax scale in 8-bit mode.
        seed: seeds the randomised SVD (with the parameter's index); saved in the state.
        transfer_moments: when the projection moves, carry the first moment into the new basis
            (``M ← M P_old P_newᵀ``, an r×r product); the second moment is kept as it is.

    Example:
        >>> opt = COAPAdamW(model.parameters(), lr=1e-3, rank_ratio_cnn=8, update_interval=32)
    """

    conv_layout = "tucker"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        rank: int | None = None,
        rank_ratio_matrix: float = 4.0,
        rank_ratio_cnn: float = 4.0,
        update_interval: int = 32,
        reproject_factor: int = 5,
        eight_bit: bool = False,
        scale: float = 1.0,
        min_numel: int = TINY_NUMEL,
        proj_lr: float = 0.1,
        block_size: int = DEFAULT_BLOCK_SIZE,
        seed: int = 0,
        transfer_moments: bool = True,
    ):
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
            rank_ratio_matrix=rank_ratio_matrix, rank_ratio_cnn=rank_ratio_cnn, update_interval=update_interval,
            reproject_factor=reproject_factor, eight_bit=eight_bit, scale=scale, min_numel=min_numel,
            proj_lr=proj_lr, block_size=block_size, seed=seed, transfer_moments=transfer_moments,
        )  # fmt: skip

    def _moves(self, state, group, step) -> bool:
        return ("proj" not in state and "proj_out" not in state) or self._schedule(step, group) is not None

    @staticmethod
    def _schedule(step: int, group: dict[str, Any]) -> str | None:
        interval = group["update_interval"]
        if step % (interval * group["reproject_factor"]) == 0:
            return "reproject"
        if step % interval == 0:
            return "correlate"
        return None

    def _refresh_matrix(self, g, state, group, step, exp_avg, r):
        if "proj" not in state:
            state["proj"] = proj.rsvd_right(g, r, generator=self._generator(state))
            return
        what = self._schedule(step, group)
        old = state["proj"]
        if what == "reproject":
            state["proj"] = proj.rsvd_right(g, r, warm=old, generator=self._generator(state))
        elif what == "correlate":
            state["proj"] = proj.correlation_step_matrix(g, old, exp_avg, lr=group["proj_lr"])
        if what is not None and group["transfer_moments"]:
            exp_avg.copy_(proj.matrix_transfer(exp_avg, old, state["proj"]))

    def _refresh_tucker(self, g, state, group, step, core_avg, ranks):
        if "proj_out" not in state:
            state["proj_out"], state["proj_in"] = proj.tucker_factors(g, ranks, generator=self._generator(state))
            return
        what = self._schedule(step, group)
        old = (state["proj_out"], state["proj_in"])
        if what == "reproject":
            gen = self._generator(state)
            state["proj_out"], state["proj_in"] = proj.tucker_factors(g, ranks, warm=old, generator=gen)
        elif what == "correlate":
            state["proj_out"], state["proj_in"] = proj.correlation_step_tucker(g, *old, core_avg, lr=group["proj_lr"])
        if what is not None and group["transfer_moments"]:
            core_avg.copy_(proj.tucker_transfer(core_avg, old, (state["proj_out"], state["proj_in"])))

