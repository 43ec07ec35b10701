"""The DP-aware preconditioner (method 3.5): the two-sided variant's row moments, its gauge equivariance,
what it changes against the one-sided one, and that a run with it is gauge invariant and resumable."""

import pytest
import torch

from prism import PRISM
from prism.pipeline import precondition
from test_gauge import _max_relative_gap, _random_gauge, _scale, _trajectory

BETAS = (0.9, 0.999)


def _step(D, two_sided, floor=0.0):
    d, r = D.shape[-2:]
    m, V = torch.zeros_like(D), D.new_zeros(*D.shape[:-2], r, r)
    rows = D.new_zeros(D.shape[:-1]) if two_sided else None
    precondition.update_moments(m, V, D, BETAS, rows, floor, 1)
    return precondition.preconditioned(m, V, 1, BETAS, floor, 1e4, 0.0, rows)


def _orthogonal(r, seed):
    return torch.linalg.qr(torch.randn(r, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def test_rows_of_equal_energy_leave_the_one_sided_update_unchanged():
    D = torch.randint(0, 2, (12, 3), generator=torch.Generator().manual_seed(0)).double() * 2 - 1  # +-1: equal rows
    D = D * 0.7
    torch.testing.assert_close(_step(D, True, floor=0.1), _step(D, False, floor=0.1))


def test_an_outlier_row_no_longer_sets_the_scale_of_the_others():
    """One feature with 100 times the others' gradients: the one-sided r x r moment then shrinks every
    row's step along that feature's direction; the two-sided one gives each row Adam's step size."""
    D = torch.randn(40, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    D[3] *= 100.0
    adam = D / D.abs()  # Adam's first step: the sign of every coordinate
    one, two = _step(D, False), _step(D, True)
    rest, w = torch.arange(40) != 3, D[3] / D[3].norm()
    along = {name: (u[rest] @ w).abs().median() for name, u in (("one", one), ("two", two), ("adam", adam))}
    assert along["one"] < 0.1 * along["adam"] and 0.5 < along["two"] / along["adam"] < 2
    for u in (two[rest], two[3:4]):  # every row, the outlier included, moves about as far as under Adam
        assert 0.5 < u.norm(dim=-1).median() / adam[0].norm() < 2


@pytest.mark.parametrize("two_sided", [False, True])
def test_preconditioner_is_orthogonally_equivariant(two_sided):
    D = torch.randn(2, 30, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    D[:, 0] *= 30.0
    O = _orthogonal(5, 3)
    torch.testing.assert_close(_step(D @ O, two_sided, floor=0.1), _step(D, two_sided, floor=0.1) @ O)


def test_the_row_floor_keeps_noise_level_rows_from_being_boosted():
    D = torch.full((20, 2), 1e-6, dtype=torch.float64)
    D[0] = 1.0
    floored = _step(D, True, floor=0.25)
    assert floored[1:].abs().max() < 1e-4  # rows below the floor are not scaled up to the outlier's size


@pytest.mark.parametrize("metric", ["frobenius", "balanced"])
@pytest.mark.parametrize("gauge", [_scale(100.0), _random_gauge], ids=["c=100", "random-R"])
def test_two_sided_trajectory_is_gauge_invariant(gauge, metric):
    options = dict(adaptive=True, lr=0.05, metric=metric, preconditioner="two_sided")
    reference = _trajectory(PRISM, None, **options)
    assert _max_relative_gap(reference, _trajectory(PRISM, gauge, **options)) < 1e-8
    one_sided = _trajectory(PRISM, None, **{**options, "preconditioner": "one_sided"})
    assert _max_relative_gap(reference, one_sided) > 1e-6  # the rows do change the steps
