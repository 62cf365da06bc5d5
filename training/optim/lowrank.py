"""The shared engine of COAP, GaLore and AdamW8bit: Adam with moments in a projected, optionally 8-bit space.

A parameter takes one of three layouts, a pure function of its shape and its
group's settings (so a resumed or a DDP-replicated optimizer picks the same):

* ``adam``   — 1-D and tiny tensors (``numel <= min_numel``): plain AdamW;
* ``matrix`` — 2-D weights, 1×1 convolutions and other tensors viewed as
  ``shape[0] × rest``: a one-sided projection ``P`` (r×n) of the gradient,
  oriented so that the longer side keeps its full size;
* ``tucker`` — k×k convolutions (k > 1) when the subclass asks for it: Tucker-2
  factors on the output and input channel modes.

``optimizer.state[p]`` holds only tensors and plain numbers: ``step`` (a CPU
float tensor, as ``torch.optim.AdamW``), ``exp_avg`` / ``exp_avg_sq`` (float32,
or int8 / uint8 codes plus ``*_absmax`` block scales when ``eight_bit``),
``proj`` (matrix) or ``proj_out`` / ``proj_in`` (Tucker), and the randomised
SVD's ``rng_seed`` / ``rng_calls``. A channels-last parameter's float moments (``adam``
layout) and, on the CPU, its codes are stored channels-last too: the same logical tensors
(8-bit blocks run over the logical order), so a state loads onto either layout.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from models.errors import ConfigError
from training.optim import projection as proj
from training.optim.quant8 import (
    DEFAULT_BLOCK_SIZE,
    block_layout,
    decode_blocks,
    dequantize_blockwise,
    encode_blocks,
    quantize_many,
)

#: Tensors with at most this many elements take plain AdamW (DESIGN.md: 32·32·3·3).
TINY_NUMEL = 32 * 32 * 3 * 3


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


#: 8-bit moments of CPU tensors are updated by the fused kernel of :mod:`training.optim.fused8bit`
#: (one pass per block); False runs the torch path (:class:`PackedMoments`, as on CUDA) instead
FUSED_CPU_STEP = True
#: values per chunk of the 8-bit step: its temporaries stay in the CPU cache (measured in docs/benchmarks/optimizers.md)
CHUNK_NUMEL = 1 << 16
#: a block-aligned tensor of at least this many values is updated in its own state tensors, chunk by chunk,
#: instead of being packed with the others (no gather, no copy back)
IN_PLACE_NUMEL = 1 << 14


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.stride() == b.stride() or (a.is_contiguous() and b.is_contiguous())  # (strides of size-1 dims aside)


def _laid_out_like(t: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """``t`` (itself when it is already so) in ``like``'s memory format, row-major when ``like`` is None."""
    if like is None:
        return t.contiguous()
    return t if _same_layout(t, like) else torch.empty_like(like, dtype=t.dtype).copy_(t)


class FusedMoments:
    """The 8-bit moments of a group's CPU tensors for one step, updated tensor by tensor by the fused kernel.

    Each block of each tensor is decoded, updated, re-encoded and its parameter (or
    update) written in one pass (:func:`training.optim.fused8bit.adam_8bit_`). The float
    first moment is decoded in full only when a projection moves (:meth:`first_moment`).
    """

    def __init__(self, states: list[dict[str, Any]], block_size: int, direct: list[torch.Tensor | None]):
        self.states = states
        self.block_size = block_size
        for s, p in zip(states, direct):  # the kernel writes the codes through flat views, in the memory order of
            layout = p if p is not None and proj.is_channels_last(p) else None  # the parameter it updates
            for key in ("exp_avg", "exp_avg_sq"):
                s[key] = _laid_out_like(s[key], layout)
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                s[key] = s[key].contiguous()
        self._m: dict[int, torch.Tensor] = {}  # decoded first moments, once asked for

    @staticmethod
    def updates_in_place(p: torch.Tensor) -> bool:
        """Whether the kernel writes ``p`` where it lies: float32, row-major or channels-last (the recipe's CPU layout)."""
        return p.dtype == torch.float32 and (p.is_contiguous() or proj.is_channels_last(p))

    def first_moment(self, i: int) -> torch.Tensor:
        """Tensor ``i``'s float32 first moment; writes to it (a moment transfer) go into this step's update."""
        if i not in self._m:
            s = self.states[i]
            self._m[i] = dequantize_blockwise(s["exp_avg"], s["exp_avg_absmax"], self.block_size)
        return self._m[i]

    def adam(self, grads, steps, step_sizes, direct, decay, beta1, beta2, eps) -> list[torch.Tensor | None]:
        """As :meth:`PackedMoments.adam`: moments updated, ``direct`` parameters updated, the other updates returned."""
        from training.optim.fused8bit import adam_8bit_  # numba compiles (or loads from its cache) on first use

        updates: list[torch.Tensor | None] = []
        for i, (s, g) in enumerate(zip(self.states, grads)):
            p = direct[i]
            target = p.detach() if p is not None else torch.empty(g.shape, dtype=torch.float32)
            g = _laid_out_like(g, s["exp_avg"])  # the kernel reads it in the codes' memory order
            adam_8bit_(s, g, target, self._m.get(i), self.block_size, beta1, beta2, eps, steps[i], step_sizes[i],
                       decay, apply_to_target=p is not None)  # fmt: skip
            updates.append(None if p is not None else target)
        return updates


class PackedMoments:
    """The 8-bit moments of a group's tensors for one step, updated with torch ops (CUDA; CPU when
    ``FUSED_CPU_STEP`` is off).

    ``optimizer.state`` keeps one code tensor and one scale tensor per parameter
    and moment. Large tensors whose size is a whole number of blocks are updated
    in those tensors, chunk by chunk; the others (small and ragged ones) are packed
    end to end (a byte per value), updated chunk by chunk, and their codes and
    scales copied back. Every chunk runs Adam in cache-sized temporaries (decode,
    update, encode). The float first moment is decoded in full only when a
    projection moves (:meth:`first_moment`).
    """

    def __init__(self, states: list[dict[str, Any]], block_size: int, direct: list[torch.Tensor | None]):
        self.states = states
        self.block_size = block_size
        for s in states:  # chunks of rows are views of row-major codes (the fused path may have left them channels-last)
            for key in ("exp_avg", "exp_avg_sq"):
                s[key] = s[key].contiguous()
        numels = [s["exp_avg"].numel() for s in states]
        self.in_place = [i for i, n in enumerate(numels) if n % block_size == 0 and n >= IN_PLACE_NUMEL]
        taken = set(self.in_place)
        self.packed = [i for i in range(len(states)) if i not in taken]
        self.slot = {i: k for k, i in enumerate(self.packed)}  # tensor index -> position among the packed
        packed_states = [states[i] for i in self.packed]
        self.layout = block_layout(tuple(s["exp_avg"].shape for s in packed_states), block_size)
        self.codes, self.absmax = {}, {}
        if packed_states:
            for k in ("exp_avg", "exp_avg_sq"):
                self.codes[k] = self.layout.pack([s[k] for s in packed_states])
                self.absmax[k] = torch.cat([s[k + "_absmax"] for s in packed_states])
        self._m: torch.Tensor | None = None  # the packed tensors' decoded first moment, once asked for
        self._m_views: list[torch.Tensor] = []
        self._m_in_place: dict[int, torch.Tensor] = {}  # the same for in-place tensors, per tensor

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, self.block_size)

    @staticmethod
    def updates_in_place(p: torch.Tensor) -> bool:
        """Whether :meth:`adam` writes ``p`` in place: float32 and row-major (its rows are views)."""
        return p.dtype == torch.float32 and p.is_contiguous()

    def first_moment(self, i: int) -> torch.Tensor:
        """Tensor ``i``'s float32 first moment; writes to it (a moment transfer) go into this step's update."""
        if i not in self.slot:
            if i not in self._m_in_place:
                codes, absmax = self.states[i]["exp_avg"], self.states[i]["exp_avg_absmax"]
                self._m_in_place[i] = decode_blocks(self._rows(codes), absmax).view(codes.shape)
            return self._m_in_place[i]
        if self._m is None:
            self._m = decode_blocks(self.codes["exp_avg"], self.absmax["exp_avg"])
            self._m_views = self.layout.unpack(self._m)
        return self._m_views[self.slot[i]]

    def adam(self, grads, steps, step_sizes, direct, decay, beta1, beta2, eps) -> list[torch.Tensor | None]:
        """Moments ← Adam's with ``grads``, stored 8-bit; returns each tensor's ``step_size·m̂ / (√v̂ + eps)``.

        Where ``direct[i]`` is a float32 parameter the update is applied to it here
        (``p ← decay·p + update``) and ``None`` returned in its place. Nothing of the
        packed size is allocated in float32 (a fresh buffer over ~32 MB page-faults
        on every step): gradients are gathered and updates spread chunk by chunk.
        """
        updates = [None if d is not None else torch.empty(g.shape, device=g.device) for g, d in zip(grads, direct)]
        rows = max(1, CHUNK_NUMEL // self.block_size)
        for i in self.in_place:
            s = self.states[i]
            mc, vc = self._rows(s["exp_avg"]), self._rows(s["exp_avg_sq"])
            ma, va = s["exp_avg_absmax"], s["exp_avg_sq_absmax"]
            g = self._rows(grads[i])
            m_float = self._rows(self._m_in_place[i]) if i in self._m_in_place else None
            dest = direct[i] if direct[i] is not None else updates[i]
            assert dest is not None  # an update buffer exists for every tensor not written in place
            target = self._rows(dest)
            bc2 = math.sqrt(1 - beta2 ** steps[i])
            for r in range(0, mc.shape[0], rows):
                c = slice(r, r + rows)
                m = m_float[c] if m_float is not None else decode_blocks(mc[c], ma[c])
                denom = self._chunk(m, mc[c], ma[c], vc[c], va[c], g[c], bc2, beta1, beta2, eps)
                if direct[i] is not None:  # p ← decay·p + step_size·m / denom
                    if decay != 1:
                        target[c].mul_(decay)
                    target[c].addcdiv_(m, denom, value=step_sizes[i])
                else:
                    torch.div(m, denom, out=target[c]).mul_(step_sizes[i])
        if self.packed:
            def mine(values: list) -> list:
                return [values[i] for i in self.packed]

            self._adam_packed(mine(grads), mine(steps), mine(step_sizes), mine(direct), mine(updates),
                              decay, beta1, beta2, eps)
        return updates

    @staticmethod
    def _chunk(m, mc, ma, vc, va, g, bc2, beta1, beta2, eps) -> torch.Tensor:
        """Adam on one chunk of rows: ``m`` (float) updated in place, both moments encoded into the codes; returns ``√v̂ + eps``."""
        v = decode_blocks(vc, va)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        encode_blocks(m, True, out=(mc, ma))
        denom = v.sqrt().div_(bc2).add_(eps)
        encode_blocks(v, False, out=(vc, va), overwrite=True)
        return denom

    def _adam_packed(self, grads, steps, step_sizes, direct, updates, decay, beta1, beta2, eps) -> None:
        """:meth:`adam` for the packed tensors: gathered and spread chunk by chunk, codes copied back at the end."""
        device = self.codes["exp_avg"].device
        blocks = torch.tensor(self.layout.blocks, device=device)  # every tensor owns its blocks
        bc2 = torch.tensor([math.sqrt(1 - beta2**s) for s in steps], device=device).repeat_interleave(blocks)[:, None]
        size = torch.tensor(step_sizes, device=device).repeat_interleave(blocks)[:, None]  # for the returned updates
        mc, ma = self.codes["exp_avg"], self.absmax["exp_avg"]
        vc, va = self.codes["exp_avg_sq"], self.absmax["exp_avg_sq"]
        decay_t = torch.tensor(decay, device=device)  # a Python number would be wrapped in a tensor once per piece
        for c, pieces in self.layout.chunks(max(1, CHUNK_NUMEL // self.layout.block_size)):
            g = self.layout.gather(grads, pieces)
            m = self._m[c] if self._m is not None else decode_blocks(mc[c], ma[c])
            denom = self._chunk(m, mc[c], ma[c], vc[c], va[c], g, bc2[c], beta1, beta2, eps)
            mine = [i for i, (t, *_) in enumerate(pieces) if direct[t] is not None]  # parameters updated here
            if len(mine) < len(pieces):
                update = self.layout.split_chunk(torch.div(m, denom).mul_(size[c]), pieces)
                rest = [i for i in range(len(pieces)) if direct[pieces[i][0]] is None]
                targets = self.layout.piece_views(updates, [pieces[i] for i in rest])
                torch._foreach_copy_(targets, [update[i] for i in rest])
            if mine:  # p ← decay·p + step_size·m / denom
                params = self.layout.piece_views(direct, [pieces[i] for i in mine])
                m_parts, d_parts = self.layout.split_chunk(m, pieces), self.layout.split_chunk(denom, pieces)
                if decay != 1:
                    torch._foreach_mul_(params, decay_t)
                torch._foreach_addcdiv_(
                    params, [m_parts[i] for i in mine], [d_parts[i] for i in mine], [step_sizes[pieces[i][0]] for i in mine]
                )
        packed_states = [self.states[i] for i in self.packed]
        for k in ("exp_avg", "exp_avg_sq"):
            torch._foreach_copy_([s[k] for s in packed_states], self.layout.unpack(self.codes[k]))
            torch._foreach_copy_([s[k + "_absmax"] for s in packed_states], self.layout.split_blocks(self.absmax[k]))


@functools.lru_cache(maxsize=4096)
def _layout(
    shape: tuple[int, ...], projected: bool, conv_layout: str, rank: int | None,
    rank_ratio_cnn: float, rank_ratio_matrix: float, min_numel: int,
) -> tuple[str, tuple]:  # fmt: skip
    """:meth:`ProjectedAdamW.layout`, cached: a pure function of the shape and the settings, asked for every step."""
    numel = math.prod(shape)
    if not projected or len(shape) < 2 or numel <= min_numel:
        return "adam", ()
    if len(shape) == 4 and shape[2] * shape[3] > 1 and conv_layout == "tucker":
        root = math.sqrt(rank_ratio_cnn)
        # A mode's rank can exceed neither its size nor the size of its unfolding's other side
        # (e.g. an 8x256x3x3 LoRA-A kernel: the input mode unfolds to 256 x 72).
        ranks = [min(d, numel // d, rank if rank is not None else max(1, math.ceil(d / root))) for d in shape[:2]]
        return "tucker", (ranks[0], ranks[1])
    rows, cols = shape[0], numel // shape[0]
    transposed = rows < cols
    if transposed:
        rows, cols = cols, rows
    r = min(cols, rank if rank is not None else max(1, math.ceil(cols / rank_ratio_matrix)))
    return "matrix", (rows, cols, r, transposed)


class ProjectedAdamW(Optimizer):
    """AdamW whose moments live in a low-rank projected space (see the subclasses).

    Subclasses set ``conv_layout`` (``"tucker"`` or ``"matrix"``) and implement
    :meth:`_refresh_matrix` / :meth:`_refresh_tucker`, which initialise and move
    the projection. With ``projected=False`` every parameter takes the ``adam``
    layout (AdamW8bit).
    """

    conv_layout = "matrix"
    projected = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
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
        transfer_moments: bool = False,
    ):
        param_list: list[Any] = list(params)
        _check(
            len(param_list) > 0,
            f"{type(self).__name__} got an empty parameter list; pass the model's trainable parameters",
        )
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
            rank_ratio_matrix=rank_ratio_matrix, rank_ratio_cnn=rank_ratio_cnn,
            update_interval=update_interval, reproject_factor=reproject_factor, eight_bit=eight_bit,
            scale=scale, min_numel=min_numel, proj_lr=proj_lr, block_size=block_size, seed=seed,
            transfer_moments=bool(transfer_moments),
        )  # fmt: skip
        self._validate(defaults)
        super().__init__(param_list, defaults)
        #: added to each parameter's index in the randomised-SVD seed (optimizer-in-backward sets it,
        #: so that one optimizer per parameter draws what one optimizer for all would)
        self.param_index_offset = 0

    # ----------------------------------------------------------------- settings
    @staticmethod
    def _validate(g: dict[str, Any]) -> None:
        _check(isinstance(g["lr"], (int, float)) and g["lr"] >= 0, f"lr must be >= 0, got {g['lr']}")
        _check(g["eps"] >= 0, f"eps must be >= 0, got {g['eps']}")
        b1, b2 = g["betas"]
        _check(0 <= b1 < 1 and 0 <= b2 < 1, f"betas must each be in [0, 1), got {g['betas']}")
        _check(g["weight_decay"] >= 0, f"weight_decay must be >= 0, got {g['weight_decay']}")
        rank = g["rank"]
        _check(
            rank is None or (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0),
            f"rank must be a positive integer (or None to use the rank ratios), got {rank!r}",
        )
        for key in ("rank_ratio_matrix", "rank_ratio_cnn"):
            _check(g[key] >= 1, f"{key} must be >= 1 (rank = dimension / ratio), got {g[key]}")
        for key in ("update_interval", "reproject_factor", "block_size"):
            _check(isinstance(g[key], int) and g[key] > 0, f"{key} must be a positive integer, got {g[key]!r}")
        _check(g["scale"] > 0, f"scale must be > 0, got {g['scale']}")
        _check(g["proj_lr"] > 0, f"proj_lr must be > 0, got {g['proj_lr']}")
        _check(g["min_numel"] >= 0, f"min_numel must be >= 0, got {g['min_numel']}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate(self.param_groups[-1])

    # ------------------------------------------------------------------- layout
    def layout(self, p: torch.Tensor, group: dict[str, Any]) -> tuple[str, tuple]:
        """``("adam", ())``, ``("matrix", (rows, cols, r, transposed))`` or ``("tucker", (r0, r1))`` for ``p``."""
        return _layout(
            tuple(p.shape), self.projected, self.conv_layout, group["rank"],
            group["rank_ratio_cnn"], group["rank_ratio_matrix"], group["min_numel"],
        )  # fmt: skip

    @staticmethod
    def _as_matrix(t: torch.Tensor, transposed: bool) -> torch.Tensor:
        m = t.reshape(t.shape[0], -1)
        return m.T if transposed else m

    # -------------------------------------------------------------------- state
    def _param_index(self, p: torch.Tensor) -> int:
        i = 0
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    return i + self.param_index_offset
                i += 1
        raise KeyError("parameter not in this optimizer")

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        kind, info = self.layout(p, group)
        state["step"] = torch.tensor(0.0)
        shape: tuple[int, ...]
        if kind == "adam":
            shape = tuple(p.shape)
        elif kind == "matrix":
            rows, cols, r, _ = info
            shape = (rows, r)
        else:
            shape = (info[0], info[1], *p.shape[2:])
        state["rng_seed"] = int(group["seed"]) * 1_000_003 + self._param_index(p)
        state["rng_calls"] = 0
        if kind == "adam" and not group["eight_bit"]:  # in p's memory format: the update's operands share strides
            zeros = [torch.zeros_like(p, dtype=torch.float32) for _ in range(2)]
        else:  # 8-bit codes keep the logical order, whatever p's layout (one state for either)
            zeros = [torch.zeros(shape, dtype=torch.float32, device=p.device) for _ in range(2)]
        self._store_moments([state], [zeros[0]], [zeros[1]], group)

    def _generator(self, state: dict[str, Any]) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(state["rng_seed"] * 1_000_033 + state["rng_calls"])
        state["rng_calls"] += 1
        return gen

    @staticmethod
    def _store_moments(states: list[dict[str, Any]], ms: list, vs: list, group: dict[str, Any]) -> None:
        """Set new moment tensors (at initialisation; steps update them in place)."""
        if group["eight_bit"]:
            bs = group["block_size"]
            for s, (c, a) in zip(states, quantize_many(ms, signed=True, block_size=bs)):
                s["exp_avg"], s["exp_avg_absmax"] = c, a
            for s, (c, a) in zip(states, quantize_many(vs, signed=False, block_size=bs)):
                s["exp_avg_sq"], s["exp_avg_sq_absmax"] = c, a
        else:
            for s, m, v in zip(states, ms, vs):
                s["exp_avg"], s["exp_avg_sq"] = m, v

    # --------------------------------------------------------------- projection
    def _refresh_matrix(self, g: torch.Tensor, state: dict, group: dict, step: int, exp_avg: torch.Tensor, r: int):
        raise NotImplementedError

    def _refresh_tucker(self, g: torch.Tensor, state: dict, group: dict, step: int, core_avg: torch.Tensor, ranks):
        raise NotImplementedError

    def _moves(self, state: dict, group: dict, step: int) -> bool:
        """Whether this step initialises or moves the projection (only then is the float first moment needed)."""
        return True

    def _project(self, p, g, state, group, kind, info, step, moment: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The projected gradient; first moves the projection when due (``moment()`` gives the first moment)."""
        if kind == "adam":
            return g
        if kind == "matrix":
            rows, cols, r, transposed = info
            gm = self._as_matrix(g, transposed)
            if r >= cols:  # full rank: the identity projection, never moved
                state.setdefault("proj", torch.eye(cols, dtype=torch.float32, device=g.device))
            elif self._moves(state, group, step):
                self._refresh_matrix(gm, state, group, step, moment(), r)
            return proj.matrix_project(gm, state["proj"])
        r0, r1 = info
        if r0 >= g.shape[0] and r1 >= g.shape[1]:
            state.setdefault("proj_out", torch.eye(g.shape[0], dtype=torch.float32, device=g.device))
            state.setdefault("proj_in", torch.eye(g.shape[1], dtype=torch.float32, device=g.device))
        elif self._moves(state, group, step):
            self._refresh_tucker(g, state, group, step, moment(), (r0, r1))
        return proj.tucker_project(g, state["proj_out"], state["proj_in"])

    def _back(self, p, update, state, kind, info) -> torch.Tensor:
        if kind == "matrix":
            full = proj.matrix_back(update, state["proj"])
            return (full.T if info[3] else full).reshape(p.shape)
        return proj.tucker_back(update, state["proj_out"], state["proj_in"])

    def _apply(self, params, updates, states, kinds, decay: float) -> None:
        """``p ← decay·p + back(update)`` for every parameter.

        A float32 projected weight takes one GEMM (back-projection, decay and add in
        one, no full-size temporary), a Tucker one also when stored channels-last; the
        rest (``adam`` layout, other dtypes and layouts) takes foreach multiply-adds over the list.
        """
        plain, plain_updates = [], []
        for p, u, st, (kind, info) in zip(params, updates, states, kinds):
            if u is None:  # already applied (8-bit moments)
                continue
            if kind == "adam":
                plain.append(p)
                plain_updates.append(u)
            elif p.dtype == torch.float32 and kind == "matrix" and p.is_contiguous():
                proj.matrix_back_add_(p.view(p.shape[0], -1), u, st["proj"], decay, transposed=info[3])
            elif p.dtype == torch.float32 and kind == "tucker" and (p.is_contiguous() or proj.is_channels_last(p)):
                proj.tucker_back_add_(p, u, st["proj_out"], st["proj_in"], decay)
            else:
                plain.append(p)
                plain_updates.append(self._back(p, u, st, kind, info))
        if not plain:
            return
        if decay != 1:
            torch._foreach_mul_(plain, decay)
        if all(p.dtype == u.dtype for p, u in zip(plain, plain_updates)):
            torch._foreach_add_(plain, plain_updates)
        else:
            for p, u in zip(plain, plain_updates):
                p.add_(u.to(p.dtype))

    # --------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One AdamW step in each parameter's projected space; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        params, states = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ConfigError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if not state:
                self._init_state(p, group, state)
            params.append(p)
            states.append(state)
        if not params:
            return
        counters = [s["step"] for s in states]
        torch._foreach_add_(counters, 1.0)
        steps = [int(s) for s in torch.stack(counters).tolist()]
        kinds = [self.layout(p, group) for p in params]
        moments8: FusedMoments | PackedMoments | None = None
        if group["eight_bit"]:  # float32 parameters of the adam layout are updated where they lie (direct)
            on_cpu = FUSED_CPU_STEP and all(p.device.type == "cpu" for p in params)
            kind8 = FusedMoments if on_cpu else PackedMoments
            direct = [p if kind == "adam" and kind8.updates_in_place(p) else None for p, (kind, _) in zip(params, kinds)]
            moments8 = kind8(states, group["block_size"], direct)
        moment = moments8.first_moment if moments8 is not None else (lambda i: states[i]["exp_avg"])
        grads = [
            self._project(p, p.grad.detach().float(), state, group, kind, info, step, functools.partial(moment, i))
            for i, (p, state, (kind, info), step) in enumerate(zip(params, states, kinds, steps))
        ]
        step_sizes = [-lr / (1 - beta1**s) * (1.0 if kind == "adam" else group["scale"]) for s, (kind, _) in zip(steps, kinds)]
        decay = 1 - lr * wd
        # Adam on the (projected) gradients, all tensors of the group at once: update = step_size·m / (√v̂ + eps)
        if moments8 is not None:  # plain float32 parameters are updated inside (None in updates)
            updates = moments8.adam(grads, steps, step_sizes, direct, decay, beta1, beta2, eps)
        else:
            ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            torch._foreach_lerp_(ms, grads, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, [math.sqrt(1 - beta2**s) for s in steps])
            torch._foreach_add_(denom, eps)
            float_updates = torch._foreach_div(ms, denom)
            torch._foreach_mul_(float_updates, step_sizes)
            updates = list(float_updates)
        self._apply(params, updates, states, kinds, decay)

    # ---------------------------------------------------------------- load/save
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like ``Optimizer.load_state_dict`` but keeps every state tensor's dtype (int8 codes, fp32 moments)."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params))
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        for key, value in saved.items():
            p = by_id[key]
            self.state[p] = {
                k: (v.clone() if k == "step" else v.to(device=p.device, copy=True)) if torch.is_tensor(v) else v
                for k, v in value.items()
            }
            group = group_of[p]
            if self.layout(p, group)[0] == "adam" and not group["eight_bit"]:  # float moments follow p's memory format
                for k in ("exp_avg", "exp_avg_sq"):
                    self.state[p][k] = torch.empty_like(p, dtype=torch.float32).copy_(self.state[p][k])
