"""Clipping: closed forms, the zero example, non-finite examples and empty batches."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prism.pipeline import per_example
from prism.pipeline.clip import clip_factors, clipped_sum
from prism.manifold import split_tangent, tangent_basis


def test_example_i_full_of_i():
    # example i's gradient has d = 4 coordinates equal to i, so its norm is 2 i
    grads = torch.arange(5, dtype=torch.float64)[:, None].expand(5, 4)
    alpha, finite = clip_factors(grads.square().sum(1), max_norm=3.0)
    torch.testing.assert_close(alpha, torch.tensor([1.0, 1.0, 0.75, 0.5, 0.375], dtype=torch.float64))
    assert finite.all()
    total = clipped_sum(alpha, finite, grads)
    torch.testing.assert_close(total, torch.full((4,), 0 + 1 + 1.5 + 1.5 + 1.5, dtype=torch.float64))


def test_non_finite_examples_contribute_nothing():
    grads = torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [float("inf"), 0.0], [0.0, 2.0]])
    alpha, finite = clip_factors(grads.square().sum(1), max_norm=1.0)
    assert finite.tolist() == [True, False, False, True]
    torch.testing.assert_close(clipped_sum(alpha, finite, grads), torch.tensor([1.0, 1.0]))


def test_empty_batch():
    alpha, finite = clip_factors(torch.zeros(0), max_norm=1.0)
    assert clipped_sum(alpha, finite, torch.zeros(0, 3, 2)).shape == (3, 2)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 9), r=st.integers(1, 4), T=st.integers(1, 5), b=st.integers(1, 6),
       C=st.floats(0.01, 10.0), scale=st.floats(1e-3, 1e6), seed=st.integers(0, 1000))
def test_one_example_moves_the_clipped_sum_by_at_most_C(m, n, r, T, b, C, scale, seed):
    """Add/remove sensitivity over two modules: the global tangent norm of the change is <= C."""
    r = min(r, m, n)
    g = torch.Generator().manual_seed(seed)
    modules = []
    for _ in range(2):
        A = torch.randn(m, r, generator=g, dtype=torch.float64)
        B = torch.randn(n, r, generator=g, dtype=torch.float64)
        x = torch.randn(b, T, n, generator=g, dtype=torch.float64)
        go = torch.randn(b, T, m, generator=g, dtype=torch.float64)
        go[0] *= scale  # the example that is added or removed, however extreme
        basis = tangent_basis(A, B)
        modules.append((basis, per_example.tangent_blocks(x, x @ B, go, basis)))
    sq = sum(per_example.tangent_sqnorms(*blocks, basis) for basis, blocks in modules)
    change_sq = 0.0
    for basis, blocks in modules:
        with_all = [clipped_sum(*clip_factors(sq, C), t) for t in blocks]
        without = [clipped_sum(*clip_factors(sq[1:], C), t[1:]) for t in blocks]
        S, U, V = split_tangent(with_all[0] - without[0], with_all[1] - without[1], basis)
        change_sq += S.square().sum() + U.square().sum() + V.square().sum()
    assert change_sq.sqrt() <= C * (1 + 1e-9)
