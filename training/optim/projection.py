"""Low-rank gradient projections as pure functions over tensors.

Nothing here keeps state: the optimizers store every projection in
``optimizer.state`` and pass it in. Every function is deterministic given its
inputs (and, for the randomised SVD, a ``torch.Generator`` seeded from the
optimizer state), so every DDP rank that sees the same gradient computes the
same projection.

Conventions:

* matrix: a gradient ``G`` (m×n, oriented so that ``m >= n``) and a projection
  ``P`` (r×n) with orthonormal rows; ``R = G Pᵀ`` (m×r), back: ``R P``;
* Tucker-2: a convolution gradient ``G`` (O×I×k×k) and factors ``U0`` (O×r0),
  ``U1`` (I×r1) with orthonormal columns; core ``G ×₀ U0ᵀ ×₁ U1ᵀ`` (r0×r1×k×k).
"""

from __future__ import annotations

import torch


def orthonormal_rows(p: torch.Tensor) -> torch.Tensor:
    """Rows of ``p`` (r×n, r <= n) made orthonormal (QR), signs fixed so the result is unique."""
    q, r = torch.linalg.qr(p.T)
    sign = torch.sign(torch.diagonal(r))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (q * sign).T.contiguous()


def randn_cpu(rows: int, cols: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Gaussian sketch drawn on the CPU (so every device draws the same numbers), moved to ``like``."""
    out = torch.randn(rows, cols, generator=generator, dtype=torch.float32)
    return out.to(device=like.device, dtype=like.dtype)


def rsvd_right(
    g: torch.Tensor,
    rank: int,
    warm: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    oversample: int = 8,
) -> torch.Tensor:
    """Top-``rank`` right singular vectors (rank×n) of ``g`` (m×n) by a randomised SVD.

    The sketch is ``Y = G Ω`` with ``Ω = [warmᵀ, Gaussian columns]`` (the previous
    projection warm-starts it; ``oversample`` random columns widen it), then
    ``Q = qr(Y)``, ``B = Qᵀ G`` and the answer is the top right singular vectors of ``B``.
    """
    m, n = g.shape
    width = min(m, n, rank + oversample)
    cols = [] if warm is None else [warm[:width].T]
    extra = width - (0 if warm is None else cols[0].shape[1])
    if extra > 0:
        cols.append(randn_cpu(n, extra, generator, g))
    omega = torch.cat(cols, dim=1)
    q, _ = torch.linalg.qr(g @ omega)
    _, _, vh = torch.linalg.svd(q.T @ g, full_matrices=False)
    return orthonormal_rows(vh[:rank])


def svd_right(g: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` right singular vectors (rank×n) of ``g`` by a full SVD (GaLore)."""
    _, _, vh = torch.linalg.svd(g, full_matrices=False)
    return vh[:rank].contiguous()


def matrix_project(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``G Pᵀ`` (m×r)."""
    return g @ p.T


def matrix_back(r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``R P`` (m×n)."""
    return r @ p


def matrix_back_add_(w: torch.Tensor, r: torch.Tensor, p: torch.Tensor, decay: float, transposed: bool) -> None:
    """``W ← decay·W + R P`` in one GEMM, for ``w`` the weight viewed as a matrix (``(R P)ᵀ`` when ``transposed``)."""
    if transposed:
        w.addmm_(p.T, r.T, beta=decay)
    else:
        w.addmm_(r, p, beta=decay)


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is a 4-D tensor stored channels-last (and not also row-major, as k = 1 kernels are)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


# The Tucker-2 products below are two plain matrix products each (mode 0 on the
# O×(I·k·k) unfolding, mode 1 on a small (r0·k·k)×I one); as one einsum they cost
# 2-3x more on the CPU. A channels-last kernel is stored O×k×k×I: both products then
# read and write it in place, in that order (no transposing copy of the full kernel).
def tucker_project(g: torch.Tensor, u0: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
    """Core ``G ×₀ U0ᵀ ×₁ U1ᵀ`` (r0×r1×k×k) of a conv gradient ``G`` (O×I×k×k)."""
    o, i, kh, kw = g.shape
    r0, r1 = u0.shape[1], u1.shape[1]
    if is_channels_last(g):
        a = u0.T @ g.permute(0, 2, 3, 1).reshape(o, kh * kw * i)  # mode 0: r0 × kk × I
        return (a.view(r0 * kh * kw, i) @ u1).view(r0, kh, kw, r1).permute(0, 3, 1, 2)  # the core, channels-last
    a = (u0.T @ g.reshape(o, i * kh * kw)).view(r0, i, kh * kw)  # mode 0: r0 × I × kk
    core = a.transpose(1, 2).reshape(r0 * kh * kw, i) @ u1  # mode 1: (r0·kk) × r1
    return core.view(r0, kh * kw, r1).transpose(1, 2).reshape(r0, r1, kh, kw)


def _tucker_expand_in(core: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
    """``core ×₁ U1`` as an r0 × (I·k·k) matrix (the mode-0 unfolding that ``U0`` multiplies)."""
    r0, r1, kh, kw = core.shape
    b = core.reshape(r0, r1, kh * kw).transpose(1, 2).reshape(r0 * kh * kw, r1) @ u1.T  # (r0·kk) × I
    return b.view(r0, kh * kw, -1).transpose(1, 2).reshape(r0, -1)


def tucker_back(core: torch.Tensor, u0: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
    """``core ×₀ U0 ×₁ U1`` (O×I×k×k)."""
    return (u0 @ _tucker_expand_in(core, u1)).view(u0.shape[0], u1.shape[0], *core.shape[2:])


def tucker_back_add_(w: torch.Tensor, core: torch.Tensor, u0: torch.Tensor, u1: torch.Tensor, decay: float) -> None:
    """``W ← decay·W + core ×₀ U0 ×₁ U1`` for a row-major or channels-last conv weight ``w`` (the last product
    is one GEMM into ``w``)."""
    if is_channels_last(w):
        o, i, kh, kw = w.shape
        r0, r1 = core.shape[:2]
        b = core.permute(0, 2, 3, 1).reshape(r0 * kh * kw, r1) @ u1.T  # (r0·kk) × I: core ×₁ U1, stored r0 × kk × I
        w.permute(0, 2, 3, 1).view(o, kh * kw * i).addmm_(u0, b.view(r0, kh * kw * i), beta=decay)
        return
    w.view(w.shape[0], -1).addmm_(u0, _tucker_expand_in(core, u1), beta=decay)


def matrix_transfer(r: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Re-express ``R`` (m×r, coordinates in ``old``'s rows) in ``new``'s rows: ``R · old · newᵀ``."""
    return r @ (old @ new.T)


def tucker_transfer(
    core: torch.Tensor, old: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Re-express a Tucker core from the ``old`` factors in the ``new`` ones (two small r×r changes of basis)."""
    return torch.einsum("rskl,ra,sb->abkl", core, old[0].T @ new[0], old[1].T @ new[1])


def unfold(g: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding of a 4-D tensor: ``dim_mode × (rest)``."""
    return g.movedim(mode, 0).reshape(g.shape[mode], -1)


def tucker_factors(
    g: torch.Tensor,
    ranks: tuple[int, int],
    warm: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial HOSVD of the channel modes: ``U_i`` = top-``r_i`` left singular vectors of unfolding ``i``.

    Each factor is a randomised SVD of the unfolding, warm-started from the
    previous factor when ``warm`` is given.
    """
    out = []
    for mode in (0, 1):
        w = None if warm is None else warm[mode].T
        out.append(rsvd_right(unfold(g, mode).T, ranks[mode], warm=w, generator=generator).T.contiguous())
    return out[0], out[1]


def _clip(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    norm = torch.stack([(t * t).sum() for t in grads]).sum().sqrt()
    factor = max_norm / norm.clamp_min(max_norm)  # 1 when the norm is already small enough
    return [t * factor for t in grads]


def correlation_step_matrix(
    g: torch.Tensor, p: torch.Tensor, exp_avg: torch.Tensor, lr: float = 0.1, max_norm: float = 1.0
) -> torch.Tensor:
    """One clipped gradient step on ``P`` for ``L = err(G PᵀP, G) · (1 − mean cos(M P, G))``.

    ``M`` (m×r) is Adam's first moment in the projected space; the cosine is per
    row of ``G``; ``err`` is the relative squared reconstruction error. Returns the
    new ``P`` with orthonormal rows.

    The gradient is written out rather than taken by autograd: with orthonormal
    rows, ``err = 1 − ‖G Pᵀ‖² / ‖G‖²`` and ``cos_i = ⟨M_i, (G Pᵀ)_i⟩ / (‖M_i‖ ‖G_i‖)``,
    so ``∂err/∂P = −2 (G Pᵀ)ᵀ G / ‖G‖²`` and ``∂ mean cos/∂P = M̃ᵀ G̃ / m`` with rows of
    ``M`` and ``G`` normalised — two r×m by m×n products, no m×n temporaries kept for a
    backward pass.
    """
    m = g.shape[0]
    r = g @ p.T
    g2 = g.pow(2).sum().clamp_min(1e-30)
    err = 1 - r.pow(2).sum() / g2
    g_norm = g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    m_unit = exp_avg / exp_avg.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (m_unit * r / g_norm).sum() / m
    d_err = (r.T @ g).mul_(-2 / g2)
    d_cos = (m_unit.T @ (g / g_norm)).div_(m)
    grad = d_err * (1 - cos) - err * d_cos
    (grad,) = _clip([grad], max_norm)
    return orthonormal_rows(p - lr * grad)


def correlation_step_tucker(
    g: torch.Tensor,
    u0: torch.Tensor,
    u1: torch.Tensor,
    core_avg: torch.Tensor,
    lr: float = 0.1,
    max_norm: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The correlation-aware step of :func:`correlation_step_matrix` on both Tucker factors.

    The cosine is per output channel between the back-projected first moment and
    ``G``; the joint gradient of ``(U0, U1)`` is clipped to ``max_norm``. With
    orthonormal factors both terms are computed on tensors of the size ``O×r1×k×k``
    (never the full kernel): ``err = 1 − ‖core‖² / ‖G‖²``, and the cosine of output
    channel ``o`` is ``⟨(M ×₀ U0)_o, (G ×₁ U1ᵀ)_o⟩ / (‖(M ×₀ U0)_o‖ ‖G_o‖)``.
    """
    u0 = u0.detach().clone().requires_grad_(True)
    u1 = u1.detach().clone().requires_grad_(True)
    g2 = g.pow(2).sum().clamp_min(1e-30)
    g_norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    with torch.enable_grad():
        a = torch.einsum("oikl,is->oskl", g, u1)
        err = 1 - torch.einsum("oskl,or->rskl", a, u0).pow(2).sum() / g2
        n = torch.einsum("rskl,or->oskl", core_avg, u0)
        cos = (n * a).flatten(1).sum(1) / (n.flatten(1).norm(dim=1).clamp_min(1e-12) * g_norm)
        grads = torch.autograd.grad(err * (1 - cos.mean()), (u0, u1))
    g0, g1 = _clip(list(grads), max_norm)
    new0 = orthonormal_rows((u0.detach() - lr * g0).T).T.contiguous()
    new1 = orthonormal_rows((u1.detach() - lr * g1).T).T.contiguous()
    return new0, new1
