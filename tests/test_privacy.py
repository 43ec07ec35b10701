"""Privacy properties measured through the optimizer: sensitivity bound, noise energy in Z,
and the exact no-privacy limit."""

import pytest
import torch

from helpers import brute_force_gradients, lora_layers, lora_Z, make_batch, per_example_losses, project, tiny_model
from prism import PRISM, NaiveDPLoRA
from prism.pipeline.noise import noise_energy


def _step_on(model, opt, batch, weights):
    (weights * per_example_losses("bert", model, batch)).sum().backward()
    opt.step()


def _dense_state(model):
    return [p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]


def _distance(x, y):
    return torch.sqrt(sum((a - b).square().sum() for a, b in zip(x, y)))


@pytest.mark.parametrize("extreme", [1.0, 1e6])
@pytest.mark.parametrize("dense_max_grad_norm", [None, 0.01, 20.0])
def test_one_example_moves_the_step_by_at_most_lr_C_over_b(extreme, dense_max_grad_norm):
    """Add/remove one example (however extreme): ||step(D') - step(D)|| <= lr C / b, over all
    LoRA modules (Z) and the dense head together, with noise off and plain Riemannian SGD; with
    dense_max_grad_norm = C_D in the norm that weighs the head's change by C / C_D."""
    lr, C, b = 1e-4, 0.5, 6
    batch = make_batch("bert", b=6, seed=5)
    states = []
    for weights in (torch.tensor([1.0] * 5 + [0.0]), torch.tensor([1.0] * 5 + [extreme])):
        model = tiny_model("bert", r=2)
        opt = PRISM(model, lr=lr, noise_multiplier=0.0, max_grad_norm=C, dense_max_grad_norm=dense_max_grad_norm,
                    expected_batch_size=b, adaptive=False, loss_reduction="sum")
        _step_on(model, opt, batch, weights.double())
        states.append((lora_Z(model), _dense_state(model)))
    (Z0, dense0), (Z1, dense1) = states
    weight = 1.0 if dense_max_grad_norm is None else C / dense_max_grad_norm
    change = torch.sqrt(_distance(Z0, Z1) ** 2 + (weight * _distance(dense0, dense1)) ** 2)
    assert change <= lr * C / b * (1 + 1e-3)
    if extreme > 1:  # clipped onto the sphere of the weighted norm: the bound is attained
        assert change >= lr * C / b * (1 - 1e-3)


def _noise_only_steps(optimizer_cls, steps, lr, gauge=1.0):
    model = tiny_model("bert", r=3, hidden=12)
    with torch.no_grad():
        for lora_A, lora_B, _ in lora_layers(model):
            lora_B.weight.mul_(gauge)
            lora_A.weight.div_(gauge)
    opt = optimizer_cls(model, lr=lr, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1.0,
                        adaptive=False, generator=torch.Generator().manual_seed(0))
    energies, predicted = [], []
    for _ in range(steps):
        before = lora_Z(model)
        naive = [(B.weight.shape[0] * A.weight.square().sum() + A.weight.shape[1] * B.weight.square().sum()).item()
                 for A, B, _ in lora_layers(model)]  # m ||B||^2 + n ||A||^2 in docs/method.md's notation
        opt.step()  # an empty batch: noise only
        energies.append([((z1 - z0).square().sum() / lr ** 2).item() for z0, z1 in zip(before, lora_Z(model))])
        predicted.append(naive)
    return torch.tensor(energies), torch.tensor(predicted), model


def test_prism_noise_energy_in_Z_is_the_closed_form():
    energies, _, model = _noise_only_steps(PRISM, steps=150, lr=1e-7)
    m, n, r = 12, 12, 3
    expected = noise_energy(1.0, m, n, r)  # std = sigma C / b = 1
    dof = energies.numel() * r * (m + n - r)
    assert abs(energies.mean().item() / expected - 1) < 4 * (2 / dof) ** 0.5


@pytest.mark.parametrize("gauge", [1.0, 10.0])
def test_naive_noise_energy_in_Z_matches_first_order_formula(gauge):
    energies, predicted, _ = _noise_only_steps(NaiveDPLoRA, steps=150, lr=1e-7, gauge=gauge)
    ratio = energies.mean() / predicted.mean()
    assert abs(ratio.item() - 1) < 0.05


def test_naive_noise_energy_grows_with_the_gauge_but_prism_does_not():
    naive_1, _, _ = _noise_only_steps(NaiveDPLoRA, steps=30, lr=1e-7)
    naive_10, _, _ = _noise_only_steps(NaiveDPLoRA, steps=30, lr=1e-7, gauge=10.0)
    prism_10, _, _ = _noise_only_steps(PRISM, steps=30, lr=1e-7, gauge=10.0)
    assert naive_10.mean() > 20 * naive_1.mean()
    assert abs(prism_10.mean().item() / noise_energy(1.0, 12, 12, 3) - 1) < 0.1


@pytest.mark.parametrize("cls", [PRISM, NaiveDPLoRA])
def test_dense_layers_get_noise_of_std_sigma_C_D_over_b(cls):
    """Empty batches, SGD with lr 1: the head moves by its noise alone, std sigma C_D / b per
    coordinate, while Z's noise energy keeps the closed form of std sigma C / b."""
    sigma, C, C_D, b, steps, lr = 2.0, 0.5, 3.0, 4.0, 40, 1e-7
    model = tiny_model("bert", r=3, hidden=12)
    opt = cls(model, lr=lr, noise_multiplier=sigma, max_grad_norm=C, dense_max_grad_norm=C_D, expected_batch_size=b,
              adaptive=False, generator=torch.Generator().manual_seed(0))
    dense_moves, Z_energy = [], []
    for _ in range(steps):
        dense_before, Z_before = _dense_state(model), lora_Z(model)
        opt.step()
        dense_moves += [(after - before).flatten() / lr for before, after in zip(dense_before, _dense_state(model))]
        Z_energy += [((z1 - z0).square().sum() / lr ** 2).item() for z0, z1 in zip(Z_before, lora_Z(model))]
    moves = torch.cat(dense_moves)
    assert abs(moves.std().item() / (sigma * C_D / b) - 1) < 4 / (2 * moves.numel()) ** 0.5
    if cls is PRISM:
        expected = noise_energy(sigma * C / b, 12, 12, 3)
        assert abs(torch.tensor(Z_energy).mean().item() / expected - 1) < 4 * (2 / (len(Z_energy) * 3 * 21)) ** 0.5


def test_no_privacy_limit_is_riemannian_gradient_descent():
    """C = inf, sigma = 0, b = batch size: one plain step is Z+ = best rank-r of Z - lr P_Z(mean G_i)."""
    lr = 0.5
    batch = make_batch("bert", b=4, seed=9)
    model = tiny_model("bert", r=2)
    G, _ = brute_force_gradients("bert", tiny_model("bert", r=2), batch)
    opt = PRISM(model, lr=lr, noise_multiplier=0.0, max_grad_norm=1e12, expected_batch_size=4, adaptive=False)
    before = [(B.weight.detach().clone(), A.weight.detach().T.clone()) for A, B, _ in lora_layers(model)]
    per_example_losses("bert", model, batch).mean().backward()
    opt.step()
    for (A, B), G_k, Z_new in zip(before, G, lora_Z(model)):
        U, S, Vh = torch.linalg.svd(A @ B.T - lr * project(G_k.mean(0), A, B))
        torch.testing.assert_close(Z_new, U[:, :2] * S[:2] @ Vh[:2], rtol=1e-9, atol=1e-12)
