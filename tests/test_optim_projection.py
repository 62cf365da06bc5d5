"""The projection functions COAP and GaLore are built from."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.optim import projection as proj


def _low_rank(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) + 1e-4 * torch.randn(m, n, generator=g)


def _subspace_gap(p: torch.Tensor, q: torch.Tensor) -> float:
    """‖PᵀP − QᵀQ‖: zero when the row spaces agree."""
    return float(torch.linalg.matrix_norm(p.T @ p - q.T @ q, ord=2))


def test_rsvd_finds_the_svd_subspace_and_is_orthonormal():
    g = _low_rank(60, 40, 5)
    exact = proj.svd_right(g, 5)
    p = proj.rsvd_right(g, 5, generator=torch.Generator().manual_seed(0))
    assert p.shape == (5, 40)
    torch.testing.assert_close(p @ p.T, torch.eye(5), atol=1e-5, rtol=0)
    assert _subspace_gap(p, exact) < 1e-3
    # warm-started from the previous projection, with a new gradient in the same subspace
    warm = proj.rsvd_right(g * 2, 5, warm=p, generator=torch.Generator().manual_seed(1))
    assert _subspace_gap(warm, exact) < 1e-3
    # the same generator seed gives the same sketch, bit for bit
    again = proj.rsvd_right(g, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p, again)


def test_tucker_project_back_and_factors():
    torch.manual_seed(0)
    core = torch.randn(3, 2, 3, 3)
    u0 = torch.linalg.qr(torch.randn(16, 3))[0]
    u1 = torch.linalg.qr(torch.randn(12, 2))[0]
    g = proj.tucker_back(core, u0, u1)  # exactly Tucker rank (3, 2)
    assert g.shape == (16, 12, 3, 3)
    torch.testing.assert_close(proj.tucker_project(g, u0, u1), core, atol=1e-5, rtol=1e-5)
    f0, f1 = proj.tucker_factors(g, (3, 2), generator=torch.Generator().manual_seed(0))
    assert f0.shape == (16, 3) and f1.shape == (12, 2)
    torch.testing.assert_close(proj.tucker_back(proj.tucker_project(g, f0, f1), f0, f1), g, atol=1e-4, rtol=1e-4)


def _coap_loss(g, p, m):
    err = ((g @ p.T) @ p - g).pow(2).sum() / g.pow(2).sum()
    return float(err * (1 - F.cosine_similarity(m @ p, g, dim=1).mean()))


def test_correlation_step_lowers_the_coap_objective_and_stays_orthonormal():
    g = _low_rank(50, 30, 4, seed=1)
    p = proj.orthonormal_rows(torch.randn(4, 30, generator=torch.Generator().manual_seed(2)))
    m = g @ p.T  # a first moment pointing along the current projection of the gradient
    new = proj.correlation_step_matrix(g, p, m, lr=0.1)
    torch.testing.assert_close(new @ new.T, torch.eye(4), atol=1e-5, rtol=0)
    assert _coap_loss(g, new, m) < _coap_loss(g, p, m)
    # Tucker: the reconstruction of the gradient improves too
    gt = torch.randn(10, 8, 3, 3)
    u0 = torch.linalg.qr(torch.randn(10, 4))[0]
    u1 = torch.linalg.qr(torch.randn(8, 4))[0]
    core_avg = proj.tucker_project(gt, u0, u1)
    n0, n1 = proj.correlation_step_tucker(gt, u0, u1, core_avg, lr=0.1)

    def err(a, b):
        return float((proj.tucker_back(proj.tucker_project(gt, a, b), a, b) - gt).pow(2).sum())

    assert err(n0, n1) < err(u0, u1)
    torch.testing.assert_close(n0.T @ n0, torch.eye(4), atol=1e-5, rtol=0)


def test_moment_transfer_keeps_the_back_projected_moment():
    p = proj.orthonormal_rows(torch.randn(4, 20))
    rot = torch.linalg.qr(torch.randn(4, 4))[0]
    new = rot @ p  # the same subspace, another basis
    m = torch.randn(7, 4)
    torch.testing.assert_close(proj.matrix_transfer(m, p, new) @ new, m @ p, atol=1e-5, rtol=1e-5)
    u = (torch.linalg.qr(torch.randn(6, 3))[0], torch.linalg.qr(torch.randn(5, 2))[0])
    r0, r1 = torch.linalg.qr(torch.randn(3, 3))[0], torch.linalg.qr(torch.randn(2, 2))[0]
    v = (u[0] @ r0, u[1] @ r1)
    core = torch.randn(3, 2, 3, 3)
    moved = proj.tucker_transfer(core, u, v)
    torch.testing.assert_close(proj.tucker_back(moved, *v), proj.tucker_back(core, *u), atol=1e-5, rtol=1e-5)


def test_matrix_correlation_gradient_matches_autograd():
    """The hand-written gradient is autograd's for the objective written in the projected space."""
    g = torch.randn(12, 9, generator=torch.Generator().manual_seed(3))
    p = proj.orthonormal_rows(torch.randn(3, 9, generator=torch.Generator().manual_seed(4)))
    m = torch.randn(12, 3, generator=torch.Generator().manual_seed(5))
    leaf = p.clone().requires_grad_(True)
    r = g @ leaf.T
    err = 1 - r.pow(2).sum() / g.pow(2).sum()
    cos = ((m / m.norm(dim=1, keepdim=True)) * r / g.norm(dim=1, keepdim=True)).sum(1).mean()
    (grad,) = torch.autograd.grad(err * (1 - cos), leaf)
    grad = grad * min(1.0, 1.0 / float(grad.norm()))
    expected = proj.orthonormal_rows(p - 0.1 * grad)
    torch.testing.assert_close(proj.correlation_step_matrix(g, p, m, lr=0.1), expected, atol=1e-5, rtol=1e-5)


def test_tucker_correlation_objective_in_small_form_equals_the_full_one():
    """The step's cheap O×r1×k×k formulas give the objective of the full-size definition."""
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(10, 8, 3, 3, generator=gen)
    u0 = torch.linalg.qr(torch.randn(10, 4, generator=gen))[0]
    u1 = torch.linalg.qr(torch.randn(8, 3, generator=gen))[0]
    core_avg = torch.randn(4, 3, 3, 3, generator=gen)
    full_err = (proj.tucker_back(proj.tucker_project(g, u0, u1), u0, u1) - g).pow(2).sum() / g.pow(2).sum()
    full_cos = F.cosine_similarity(proj.tucker_back(core_avg, u0, u1).flatten(1), g.flatten(1), dim=1).mean()
    a = torch.einsum("oikl,is->oskl", g, u1)
    n = torch.einsum("rskl,or->oskl", core_avg, u0)
    err = 1 - proj.tucker_project(g, u0, u1).pow(2).sum() / g.pow(2).sum()
    cos = ((n * a).flatten(1).sum(1) / (n.flatten(1).norm(dim=1) * g.flatten(1).norm(dim=1))).mean()
    torch.testing.assert_close(err, full_err, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cos, full_cos, atol=1e-5, rtol=1e-4)
