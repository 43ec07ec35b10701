"""Hook-based per-example tangent norms and clipped sums == brute-force float64 reference."""

import pytest
import torch

from helpers import (KINDS, assemble, brute_force_gradients, current_factors, make_batch, per_example_losses,
                     project, select, tiny_model)
from prism import PRISM, NaiveDPLoRA
from prism.manifold import split_tangent


def _run_hooks(kind, model, optimizer, batch, micro_batch, reduction):
    norms = []
    b = batch["input_ids"].shape[0]
    for start in range(0, b, micro_batch):
        losses = per_example_losses(kind, model, select(batch, slice(start, start + micro_batch)))
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
        norms.append(optimizer.stats.last_norms)
    return torch.cat(norms)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_prism_norms_and_clipped_sums_match_brute_force(kind, reduction):
    model = tiny_model(kind, r=2)
    batch = make_batch(kind, b=5, seed=1)
    G, dense = brute_force_gradients(kind, tiny_model(kind, r=2), batch)  # same seed, same weights
    # the reference's norms decide C: about half the examples get clipped
    opt = PRISM(model, lr=0.1, noise_multiplier=0.0, max_grad_norm=1e9, expected_batch_size=5,
                loss_reduction=reduction)
    projected = []
    for k in range(len(opt.pairs)):
        A, B, _ = current_factors(opt, k)
        projected.append(project(G[k], A, B))
    ref_sq = sum(p.square().sum((1, 2)) for p in projected) + sum(g.flatten(1).square().sum(1) for g in dense.values())
    C = ref_sq.sqrt().median().item()
    opt.remove_hooks()  # the factors are balanced now: an optimizer with the bound C keeps them as they are
    opt = PRISM(model, lr=0.1, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=5, loss_reduction=reduction)

    norms = _run_hooks(kind, model, opt, batch, micro_batch=2, reduction=reduction)
    torch.testing.assert_close(norms, ref_sq.sqrt(), rtol=1e-9, atol=1e-12)

    alpha = (C / ref_sq.sqrt()).clamp(max=1)
    assert 0 < int((alpha < 1).sum()) < 5
    sums = opt.clipped_sums()
    for k, pair in enumerate(opt.pairs):
        _, _, basis = current_factors(opt, k)
        got = assemble(*split_tangent(*sums.pop(pair.name), basis), basis)
        torch.testing.assert_close(got, torch.einsum("b,bmn->mn", alpha, projected[k]), rtol=1e-9, atol=1e-12)
    dense_sums = [s for module_sums in sums.values() for s in module_sums]
    assert len(dense_sums) == len(dense)
    for got, ref in zip(dense_sums, dense.values()):
        torch.testing.assert_close(got, torch.einsum("b,b...->...", alpha, ref), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_naive_factor_gradients_match_brute_force(kind):
    model = tiny_model(kind, r=2)
    batch = make_batch(kind, b=4, seed=2)
    G, dense = brute_force_gradients(kind, tiny_model(kind, r=2), batch)
    opt = NaiveDPLoRA(model, lr=0.1, noise_multiplier=0.0, max_grad_norm=1e9, expected_batch_size=4,
                      loss_reduction="sum")
    norms = _run_hooks(kind, model, opt, batch, micro_batch=3, reduction="sum")
    ref_sq = sum(g.flatten(1).square().sum(1) for g in dense.values())
    for k, pair in enumerate(opt.pairs):
        A, B = pair.lora_B.weight.detach(), pair.lora_A.weight.detach().T
        gA, gB = G[k] @ B, G[k].transpose(1, 2) @ A  # grad of lora_B.weight, grad of lora_A.weight^T
        ref_sq = ref_sq + gA.flatten(1).square().sum(1) + gB.flatten(1).square().sum(1)
        sums = opt.clipped_sums()[pair.name]
        torch.testing.assert_close(sums[0], gA.sum(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sums[1], gB.sum(0).T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(norms, ref_sq.sqrt(), rtol=1e-9, atol=1e-12)
