"""GaLore (Zhao et al., ICML 2024): the baseline for COAP.

The projection is the top-``r`` right singular vectors of the current gradient,
recomputed by a full SVD every ``update_interval`` steps (no correlation term, no
warm start). Convolutions are projected as ``O × (I·k·k)`` matrices, as GaLore
does for any tensor of more than two dimensions.
"""

from __future__ import annotations

from training.optim import projection as proj
from training.optim.lowrank import TINY_NUMEL, ProjectedAdamW
from training.optim.quant8 import DEFAULT_BLOCK_SIZE


class GaLoreAdamW(ProjectedAdamW):
    """AdamW with GaLore's projection; same interface as :class:`~training.optim.coap.COAPAdamW`.

    ``update_interval`` is GaLore's ``T`` (200 in the paper); ``rank_ratio_cnn`` and
    ``reproject_factor`` are accepted for a uniform interface and unused.
    """

    conv_layout = "matrix"

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
        update_interval: int = 200,
        reproject_factor: int = 1,
        eight_bit: bool = False,
        scale: float = 1.0,
        min_numel: int = TINY_NUMEL,
        proj_lr: float = 0.1,
        block_size: int = DEFAULT_BLOCK_SIZE,
        seed: int = 0,
    ):
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
            rank_ratio_matrix=rank_ratio_matrix, rank_ratio_cnn=rank_ratio_cnn, update_interval=update_interval,
            reproject_factor=reproject_factor, eight_bit=eight_bit, scale=scale, min_numel=min_numel,
            proj_lr=proj_lr, block_size=block_size, seed=seed,
        )  # fmt: skip

    def _moves(self, state, group, step) -> bool:
        return "proj" not in state or (step - 1) % group["update_interval"] == 0

    def _refresh_matrix(self, g, state, group, step, exp_avg, r):
        state["proj"] = proj.svd_right(g, r)

    def _refresh_tucker(self, g, state, group, step, core_avg, ranks):  # conv_layout is "matrix"
        raise AssertionError("GaLore projects convolutions as matrices")
