"""PRISM(momentum_shrinkage=True) (method 3.5): the closed-form noise energy it relies on, the noise share of
the first moment, what it does to steps with and without signal, and its gauge invariance."""

import pytest
import torch

from helpers import lora_Z, make_batch, per_example_losses, tiny_model
from prism import PRISM
from prism.functional import StepConfig, privatize_factors, privatize_tangent
from prism.manifold import horizontal_lift, symmetric_lift, tangent_basis
from prism.pipeline import retract, shrink
from prism.pipeline.noise import noise_energy
from test_gauge import _max_relative_gap, _scale, _trajectory


def _balanced_factors(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    A, B = (torch.randn(d, r, generator=g, dtype=torch.float64) for d in (m, n))
    return retract.balance(A * torch.linspace(0.3, 3.0, r, dtype=torch.float64), B)


@pytest.mark.parametrize("metric", ["frobenius", "balanced"])
def test_the_noise_is_isotropic_with_the_closed_form_energy_in_the_moment_metric(metric):
    """The step's own noise, lifted to the factors as the step lifts it, measured by moment_energy: mean
    energy std^2 r (m + n - r) over 4,000 draws (within 1 %), at m = 12, n = 9, r = 4 and unequal singular
    values (where the factor norm alone would be far off for the Frobenius metric)."""
    m, n, r, std = 12, 9, 4, 0.7
    A, B = _balanced_factors(m, n, r, 0)
    basis = tangent_basis(A, B)
    cfg = StepConfig(lr=1.0, noise_std=std, expected_batch_size=1.0, adaptive=True, betas=(0.9, 0.999), eps=0.0,
                     weight_decay=0.0, metric=metric)
    g = torch.Generator().manual_seed(1)
    zeros = torch.zeros(m, r, dtype=torch.float64), torch.zeros(n, r, dtype=torch.float64)
    energies, factor_norms = [], []
    for _ in range(4000):
        if metric == "balanced":
            dA, dB = privatize_factors(A, B, *zeros, basis, cfg, g)
        else:
            dA, dB = horizontal_lift(A, B, *symmetric_lift(*privatize_tangent(*zeros, basis, cfg, g), basis))
        energies.append(float(shrink.moment_energy(metric, dA, dB, A, B)))
        factor_norms.append(float(dA.square().sum() + dB.square().sum()))
    expected = noise_energy(std, m, n, r)
    assert abs(sum(energies) / len(energies) / expected - 1) < 0.01
    if metric == "frobenius":
        assert abs(sum(factor_norms) / len(factor_norms) / expected - 1) > 0.2


@pytest.mark.parametrize("step", [1, 3, 40])
def test_noise_share_is_the_bias_corrected_moment_of_independent_draws(step):
    beta1, g = 0.9, torch.Generator().manual_seed(step)
    draws = torch.randn(step, 20000, generator=g, dtype=torch.float64)
    moment = torch.zeros(20000, dtype=torch.float64)
    for row in draws:
        moment.lerp_(row, 1 - beta1)
    measured = (moment / (1 - beta1 ** step)).square().mean().item()
    assert abs(measured / shrink.noise_share(beta1, step) - 1) < 0.03


def test_shrinkage_is_gauge_invariant_and_bounded():
    A, B = _balanced_factors(10, 8, 3, 2)
    O = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64))[0]
    mA, mB = torch.randn(2, 10, 3, dtype=torch.float64), torch.randn(2, 8, 3, dtype=torch.float64)
    energy = shrink.moment_energy("frobenius", mA, mB, A, B)
    torch.testing.assert_close(shrink.moment_energy("frobenius", mA @ O, mB @ O, A @ O, B @ O), energy)
    Z = mA @ B.mT + A @ mB.mT
    torch.testing.assert_close(energy, Z.square().sum((-2, -1)))
    E = float(energy.mean()) / 10
    s = shrink.shrinkage(energy, E, 0.9, 5)
    assert s.shape == (2,) and bool(((s >= 0) & (s <= 1)).all())
    assert float(shrink.shrinkage(energy * 1e-6, E, 0.9, 5).max()) == 0.0  # all noise
    assert float(shrink.shrinkage(energy * 1e6, E, 0.9, 5).min()) > 0.999  # all signal


def _run(noise, shrinkage, steps=12, seed=0, lr=0.05):
    """Z after each step and each step's shrinkage factors (tiny Llama trained through its own LM head, no
    dense layer sharing the clip; C = 0.05: every example clipped)."""
    model = tiny_model("llama", r=3, hidden=12)
    opt = PRISM(model, lr=lr, noise_multiplier=noise, max_grad_norm=0.05, expected_batch_size=6,
                generator=torch.Generator().manual_seed(seed), momentum_shrinkage=shrinkage)
    zs, factors = [lora_Z(model)], []
    for step in range(steps):
        per_example_losses("llama", model, make_batch("llama", b=6, seed=step)).mean().backward()
        opt.step()
        opt.zero_grad()
        zs.append(lora_Z(model))
        if shrinkage:
            factors.append(torch.stack([opt.state[p.lora_B.weight]["momentum_shrinkage"] for p in opt.pairs]))
    return zs, factors


def _step_norms(zs):
    return torch.tensor([sum(float((b - a).norm()) for a, b in zip(z0, z1)) for z0, z1 in zip(zs, zs[1:])])


def test_without_noise_the_step_is_untouched():
    plain, _ = _run(0.0, False, steps=4)
    shrunk, factors = _run(0.0, True, steps=4)
    assert _max_relative_gap(plain, shrunk) < 1e-12
    assert bool((torch.stack(factors) == 1).all())


def test_when_noise_drowns_the_gradients_the_steps_shrink():
    """sigma = 50 on a batch of 6 (noise std 0.4 against a clipped mean of at most C = 0.05): the moment is
    noise, the factors stay near 0 after the first steps, and the steps are several times smaller."""
    plain, _ = _run(50.0, False)
    shrunk, factors = _run(50.0, True)
    late = torch.stack(factors[4:])
    assert float(late.mean()) < 0.15
    assert float(_step_norms(shrunk)[4:].mean()) < 0.3 * float(_step_norms(plain)[4:].mean())


def test_when_the_gradients_stand_out_the_steps_stay_whole():
    """sigma = 1e-5 (noise std 1e-7 per coordinate against a clipped mean of up to C = 0.05): s > 0.99."""
    _, factors = _run(1e-5, True, steps=6)
    assert float(torch.stack(factors).min()) > 0.99


def test_shrinkage_keeps_the_trajectory_gauge_invariant():
    options = dict(adaptive=True, momentum_shrinkage=True, noise=5.0, seed=7)
    reference = _trajectory(PRISM, None, **options)
    assert _max_relative_gap(reference, _trajectory(PRISM, _scale(100.0), **options)) < 1e-8
    assert _max_relative_gap(reference, _trajectory(PRISM, None, **{**options, "momentum_shrinkage": False})) > 1e-6


def test_shrinkage_needs_the_adaptive_step():
    with pytest.raises(ValueError, match="momentum_shrinkage.*adaptive=True"):
        PRISM(tiny_model("bert", r=3, hidden=12), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0,
              expected_batch_size=6, adaptive=False, momentum_shrinkage=True)
