"""Geometry: projector identities, lifts, Sylvester, retraction, balance, Procrustes, equivariance."""

import pytest
import torch

from helpers import assemble, project
from prism import manifold


def _factors(m=9, n=7, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, r, generator=g, dtype=torch.float64),
            torch.randn(n, r, generator=g, dtype=torch.float64), g)


def _tangent(A, B, g):
    G = torch.randn(A.shape[0], B.shape[0], generator=g, dtype=torch.float64)
    basis = manifold.tangent_basis(A, B)
    return G, basis, manifold.split_tangent(G @ basis.Q_B, G.T @ basis.Q_A, basis)


def test_blocks_represent_the_projection_and_its_norm():
    A, B, g = _factors()
    G, basis, (S, U, V) = _tangent(A, B, g)
    P = project(G, A, B)
    torch.testing.assert_close(assemble(S, U, V, basis), P)
    torch.testing.assert_close(P.square().sum(), S.square().sum() + U.square().sum() + V.square().sum())
    torch.testing.assert_close(project(P, A, B), P)  # idempotent
    assert basis.Q_A.T @ U == pytest.approx(0, abs=1e-12) and basis.Q_B.T @ V == pytest.approx(0, abs=1e-12)


def test_projection_depends_on_Z_only():
    A, B, g = _factors()
    G = torch.randn(A.shape[0], B.shape[0], generator=g, dtype=torch.float64)
    R = torch.randn(3, 3, generator=g, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(project(G, A @ R, B @ torch.linalg.inv(R).T), project(G, A, B))


def test_lifts_reproduce_the_tangent_vector_and_horizontal_is_minimal():
    A, B, g = _factors()
    _, basis, (S, U, V) = _tangent(A, B, g)
    xi = assemble(S, U, V, basis)
    dA, dB = manifold.symmetric_lift(S, U, V, basis)
    torch.testing.assert_close(dA @ B.T + A @ dB.T, xi)
    hA, hB = manifold.horizontal_lift(A, B, dA, dB)
    torch.testing.assert_close(hA @ B.T + A @ hB.T, xi)
    torch.testing.assert_close(A.T @ hA, hB.T @ B)
    # every lift is (dA + A Om, dB - B Om^T); the horizontal one has the smallest norm
    for _ in range(5):
        Om = torch.randn(3, 3, generator=g, dtype=torch.float64)
        other = (hA + A @ Om).square().sum() + (hB - B @ Om.T).square().sum()
        assert other >= hA.square().sum() + hB.square().sum()


def test_sylvester():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(4, 6, 6, generator=g, dtype=torch.float64)
    M, N = X[0] @ X[0].T + 0.1 * torch.eye(6, dtype=torch.float64), X[1] @ X[1].T + torch.eye(6, dtype=torch.float64)
    sol = manifold.solve_sylvester_spd(M, N, X[2])
    torch.testing.assert_close(M @ sol + sol @ N, X[2])


@pytest.mark.parametrize("m,n,r", [(9, 7, 3), (5, 12, 4), (6, 6, 3), (4, 30, 1)])
def test_retraction_is_the_best_rank_r_approximation(m, n, r):
    A, B, g = _factors(m, n, r, seed=m)
    dA, dB = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(n, r, generator=g, dtype=torch.float64)
    lr, wd = 0.3, 0.1
    A2, B2 = manifold.retract(A, B, dA, dB, lr, wd)
    target = (1 - lr * wd) * (A @ B.T) - lr * (dA @ B.T + A @ dB.T)
    U, S, Vh = torch.linalg.svd(target)
    torch.testing.assert_close(A2 @ B2.T, U[:, :r] * S[:r] @ Vh[:r])
    torch.testing.assert_close(A2.T @ A2, B2.T @ B2)  # balanced


def test_balance_and_procrustes_keep_Z():
    A, B, g = _factors()
    A1, B1 = manifold.balance(3.0 * A, B / 3.0)
    torch.testing.assert_close(A1 @ B1.T, A @ B.T)
    torch.testing.assert_close(A1.T @ A1, B1.T @ B1)
    O = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    A2, B2 = manifold.procrustes_align(A1 @ O, B1 @ O, A1, B1)
    torch.testing.assert_close(A2, A1)
    torch.testing.assert_close(B2, B1)


def test_horizontal_lift_is_orthogonally_equivariant():
    A, B, g = _factors()
    dA, dB = torch.randn_like(A), torch.randn_like(B)
    O = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    hA, hB = manifold.horizontal_lift(A, B, dA, dB)
    oA, oB = manifold.horizontal_lift(A @ O, B @ O, dA @ O, dB @ O)
    torch.testing.assert_close(oA, hA @ O)
    torch.testing.assert_close(oB, hB @ O)
