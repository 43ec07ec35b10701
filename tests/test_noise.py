"""Tangent noise: closed-form energy, isotropic in the tangent space, nothing outside it, seeded."""

import math

import torch

from helpers import assemble, project
from prism.pipeline import noise
from prism.manifold import tangent_basis


def test_energy_isotropy_and_support():
    m, n, r, std, draws = 8, 6, 2, 0.3, 4000
    g = torch.Generator().manual_seed(1)
    A = torch.randn(m, r, generator=g, dtype=torch.float64) * torch.tensor([5.0, 0.01], dtype=torch.float64)
    B = torch.randn(n, r, generator=g, dtype=torch.float64)
    basis = tangent_basis(A, B)
    samples = torch.stack([assemble(*noise.tangent_noise(basis, std, g), basis) for _ in range(draws)])
    dim = r * (m + n - r)
    energy = samples.square().sum((1, 2))
    expected = noise.noise_energy(std, m, n, r)
    assert expected == std ** 2 * dim
    # chi^2 with `dim` degrees of freedom: the mean has relative std sqrt(2 / (dim * draws))
    assert abs(energy.mean().item() / expected - 1) < 4 * math.sqrt(2 / (dim * draws))
    # nothing outside the tangent space
    torch.testing.assert_close(project(samples, A, B), samples)
    # isotropic: the covariance in an orthonormal basis of the tangent space is std^2 I
    E = torch.randn(dim, m, n, generator=g, dtype=torch.float64)
    E = project(E, A, B).reshape(dim, -1)
    E = torch.linalg.qr(E.T)[0].T  # dim orthonormal tangent directions
    coords = samples.reshape(draws, -1) @ E.T
    cov = coords.T @ coords / draws
    assert (cov.diagonal() / std ** 2 - 1).abs().max() < 0.15
    assert (cov - torch.diag(cov.diagonal())).abs().max() / std ** 2 < 0.15


def test_noise_is_reproducible_from_the_generator():
    A = torch.randn(8, 2, dtype=torch.float64)
    basis = tangent_basis(A, torch.randn(6, 2, dtype=torch.float64))
    first = noise.tangent_noise(basis, 1.0, torch.Generator().manual_seed(7))
    again = noise.tangent_noise(basis, 1.0, torch.Generator().manual_seed(7))
    other = noise.tangent_noise(basis, 1.0, torch.Generator().manual_seed(8))
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_stack_of_bases_gets_independent_noise_in_each_tangent_space():
    g = torch.Generator().manual_seed(2)
    k, m, n, r, std, draws = 3, 8, 6, 2, 0.5, 3000
    A = torch.randn(k, m, r, generator=g, dtype=torch.float64)
    B = torch.randn(k, n, r, generator=g, dtype=torch.float64)
    stack = tangent_basis(A, B)
    S, U, V = (torch.stack(parts) for parts in zip(*(noise.tangent_noise(stack, std, g) for _ in range(draws))))
    assert S.shape == (draws, k, r, r) and U.shape == (draws, k, m, r) and V.shape == (draws, k, n, r)
    dim = r * (m + n - r)
    for i, basis in enumerate(stack.unbind()):
        samples = assemble(S[:, i], U[:, i], V[:, i], basis)
        torch.testing.assert_close(project(samples, A[i], B[i]), samples)
        energy = samples.square().sum((1, 2)).mean().item()
        assert abs(energy / noise.noise_energy(std, m, n, r) - 1) < 4 * math.sqrt(2 / (dim * draws))
    # modules' noises are uncorrelated: the correlation of module 0's and module 1's S entries is ~0
    correlation = torch.corrcoef(torch.stack([S[:, 0].flatten(), S[:, 1].flatten()]))[0, 1]
    assert abs(correlation) < 4 / math.sqrt(draws * r * r)


def test_horizontal_noise_of_the_balanced_metric_moves_z_only_and_is_isotropic_there():
    m, n, r, std, draws = 7, 5, 2, 0.4, 4000
    g = torch.Generator().manual_seed(3)
    A = torch.randn(m, r, generator=g, dtype=torch.float64) * torch.tensor([4.0, 0.05], dtype=torch.float64)
    B = torch.randn(n, r, generator=g, dtype=torch.float64)
    nA, nB = (torch.stack(parts) for parts in zip(*(noise.horizontal_noise(A, B, std, g) for _ in range(draws))))
    # horizontal: orthogonal to every gauge direction (A Om, -B Om^T), i.e. A^T nA = nB^T B
    torch.testing.assert_close(A.T @ nA, nB.mT @ B)
    dim = r * (m + n - r)
    energy = nA.square().sum((1, 2)) + nB.square().sum((1, 2))
    assert abs(energy.mean().item() / noise.noise_energy(std, m, n, r) - 1) < 4 * math.sqrt(2 / (dim * draws))
    # isotropic on the horizontal space: in an orthonormal basis of it, the covariance is std^2 I
    flat = torch.cat([nA.flatten(1), nB.flatten(1)], 1)
    basis = torch.linalg.svd(flat, full_matrices=False)[2][:dim]  # the span the samples occupy
    assert torch.linalg.matrix_rank(flat[:200]).item() == dim
    cov = (flat @ basis.T).T @ (flat @ basis.T) / draws
    assert (torch.linalg.eigvalsh(cov) / std ** 2 - 1).abs().max() < 0.15
