"""Geometry: projector identities, lifts, Sylvester, retraction, balance, Procrustes, equivariance."""

import pytest
import torch

from helpers import assemble, project
from prism import manifold
from prism.pipeline import retract


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
    A2, B2 = retract.retract(A, B, dA, dB, lr, wd)
    target = (1 - lr * wd) * (A @ B.T) - lr * (dA @ B.T + A @ dB.T)
    U, S, Vh = torch.linalg.svd(target)
    torch.testing.assert_close(A2 @ B2.T, U[:, :r] * S[:r] @ Vh[:r])
    torch.testing.assert_close(A2.T @ A2, B2.T @ B2)  # balanced


def test_balance_and_procrustes_keep_Z():
    A, B, g = _factors()
    A1, B1 = retract.balance(3.0 * A, B / 3.0)
    torch.testing.assert_close(A1 @ B1.T, A @ B.T)
    torch.testing.assert_close(A1.T @ A1, B1.T @ B1)
    O = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    A2, B2 = retract.procrustes_align(A1 @ O, B1 @ O, A1, B1)
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


@pytest.mark.parametrize("adaptive, preconditioner", [(True, "two_sided"), (True, "one_sided"), (False, "two_sided")])
def test_a_stack_of_modules_takes_the_steps_each_module_takes_alone(adaptive, preconditioner):
    """The optimizer runs the modules of one shape as one stack (k, m, r): without noise, two steps
    of the stack (moments included) equal two steps of each module on its own."""
    from prism.functional import StepConfig, prism_module_step

    g = torch.Generator().manual_seed(4)
    k, m, n, r = 3, 9, 7, 3
    A = torch.randn(k, m, r, generator=g, dtype=torch.float64)
    B = torch.randn(k, n, r, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1])[:, None, None]
    cfg = StepConfig(lr=0.1, noise_std=0.0, expected_batch_size=4.0, adaptive=adaptive, betas=(0.9, 0.999),
                     eps=1e-8, weight_decay=0.01, max_condition=50.0, preconditioner=preconditioner)
    stacked_state, states = {}, [{} for _ in range(k)]
    for _ in range(2):
        Y, W = torch.randn(k, m, r, generator=g, dtype=torch.float64), torch.randn(k, n, r, generator=g,
                                                                                    dtype=torch.float64)
        new_A, new_B = prism_module_step(A, B, Y, W, manifold.tangent_basis(A, B), stacked_state, cfg, g)
        for i in range(k):
            alone = prism_module_step(A[i], B[i], Y[i], W[i], manifold.tangent_basis(A[i], B[i]), states[i], cfg, g)
            torch.testing.assert_close(new_A[i], alone[0])
            torch.testing.assert_close(new_B[i], alone[1])
            for key, value in states[i].items():
                torch.testing.assert_close(stacked_state[key][i] if torch.is_tensor(value) else stacked_state[key],
                                           value)
        A, B = new_A, new_B
    assert bool(stacked_state) == adaptive


def test_geometry_noise_floors_of_a_stack_are_each_modules():
    from prism.pipeline.precondition import noise_floors

    A, B, _ = _factors()
    stack = manifold.tangent_basis(torch.stack([A, 2 * A]), torch.stack([B, B / 3]))
    floors = noise_floors("geometry", 0.5, 0.3, stack, 9, 7)
    for i, basis in enumerate(stack.unbind()):
        alone = noise_floors("geometry", 0.5, 0.3, basis, 9, 7)
        for got, want in zip(floors, alone):
            torch.testing.assert_close(got[i], want)
