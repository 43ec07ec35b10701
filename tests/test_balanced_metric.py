"""PRISM's "balanced" metric: examples clipped and noised in the factor gradients at Z's balanced
factorisation (docs/method.md 3.7). Its clip norms and clipped sums against a brute-force
reference, its first step against naive DP-SGD from the same balanced factors, and its refusals.
Gauge invariance and the noise are tested with the other metric's (test_gauge.py, test_noise.py)."""

import pytest
import torch

from helpers import brute_force_gradients, current_factors, lora_Z, make_batch, per_example_losses, tiny_model
from prism import PRISM, NaiveDPLoRA

BALANCED = dict(metric="balanced", noise_multiplier=0.0, expected_batch_size=5, loss_reduction="sum")


def test_norms_and_clipped_sums_are_the_factor_gradients_at_the_balanced_factors():
    model = tiny_model("bert", r=2)
    batch = make_batch("bert", b=5, seed=1)
    G, dense = brute_force_gradients("bert", tiny_model("bert", r=2), batch)
    opt = PRISM(model, lr=0.1, max_grad_norm=1e9, **BALANCED)  # balances the factors
    grads = []
    for k in range(len(opt.pairs)):
        A, B, _ = current_factors(opt, k)
        torch.testing.assert_close(A.T @ A, B.T @ B)
        grads.append((G[k] @ B, G[k].transpose(1, 2) @ A))
    ref_sq = sum(gA.flatten(1).square().sum(1) + gB.flatten(1).square().sum(1) for gA, gB in grads)
    ref_sq = ref_sq + sum(g.flatten(1).square().sum(1) for g in dense.values())
    C = ref_sq.sqrt().median().item()
    opt.remove_hooks()
    opt = PRISM(model, lr=0.1, max_grad_norm=C, **BALANCED)
    per_example_losses("bert", model, batch).sum().backward()
    torch.testing.assert_close(opt.stats.last_norms, ref_sq.sqrt(), rtol=1e-9, atol=1e-12)
    alpha = (C / ref_sq.sqrt()).clamp(max=1)
    assert 0 < int((alpha < 1).sum()) < 5
    sums = opt.clipped_sums()
    for k, pair in enumerate(opt.pairs):
        _, _, basis = current_factors(opt, k)
        Y, W = sums[pair.name]
        torch.testing.assert_close(Y @ basis.R_B, torch.einsum("b,bmr->mr", alpha, grads[k][0]), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(W @ basis.R_A, torch.einsum("b,bnr->nr", alpha, grads[k][1]), rtol=1e-9, atol=1e-12)


def _first_step(model, opt, batch):
    before = lora_Z(model)
    per_example_losses("bert", model, batch).sum().backward()
    assert opt.stats.clipped == 5
    norms = opt.stats.last_norms.clone()
    opt.step()
    return norms, [z - z0 for z, z0 in zip(lora_Z(model), before)]


@pytest.mark.parametrize("metric", ["balanced", "frobenius"])
def test_first_step_is_naive_dp_sgd_from_the_balanced_factors_to_first_order(metric):
    """Noise off, SGD: the balanced metric moves Z by -lr (sum_i alpha_i (G_i B B^T + A A^T G_i)) / b
    + O(lr^2), as naive DP-SGD from the same (balanced) factors does; the Frobenius metric does not."""
    lr, batch = 1.0, make_batch("bert", b=5, seed=4)  # the toy's steps are tiny: the O(lr^2) gap is ~1e-5
    model = tiny_model("bert", r=2)
    prism_opt = PRISM(model, lr=lr, max_grad_norm=0.05, adaptive=False, **{**BALANCED, "metric": metric})
    naive_model = tiny_model("bert", r=2)
    naive_model.load_state_dict(model.state_dict())  # the balanced factors
    naive_opt = NaiveDPLoRA(naive_model, lr=lr, max_grad_norm=0.05, adaptive=False,
                            **{k: v for k, v in BALANCED.items() if k != "metric"})
    prism_norms, prism_steps = _first_step(model, prism_opt, batch)
    naive_norms, naive_steps = _first_step(naive_model, naive_opt, batch)
    gaps = [((dp - dn).norm() / dn.norm()).item() for dp, dn in zip(prism_steps, naive_steps)]
    if metric == "balanced":
        torch.testing.assert_close(prism_norms, naive_norms, rtol=1e-10, atol=0)
        assert max(gaps) < 1e-4
    else:
        assert max(gaps) > 1e-2


def test_geometry_floor_with_the_balanced_metric_is_refused():
    with pytest.raises(ValueError, match="floor_mode='scalar'"):
        PRISM(tiny_model("bert"), lr=0.1, max_grad_norm=1.0, floor_mode="geometry", **BALANCED)


def test_a_checkpoint_loads_only_with_its_metric():
    saved = PRISM(tiny_model("bert"), lr=0.1, max_grad_norm=1.0, **BALANCED).state_dict()
    with pytest.raises(ValueError, match="saved with metric=balanced"):
        PRISM(tiny_model("bert"), lr=0.1, max_grad_norm=1.0, **{**BALANCED, "metric": "frobenius"}).load_state_dict(saved)
    old = PRISM(tiny_model("bert"), lr=0.1, max_grad_norm=1.0, **{**BALANCED, "metric": "frobenius"}).state_dict()
    del old["prism"]["metric"]  # a checkpoint from before the option: the Frobenius metric
    PRISM(tiny_model("bert"), lr=0.1, max_grad_norm=1.0, **{**BALANCED, "metric": "frobenius"}).load_state_dict(old)
    with pytest.raises(ValueError, match="saved with metric=frobenius"):
        PRISM(tiny_model("bert"), lr=0.1, max_grad_norm=1.0, **BALANCED).load_state_dict(old)


def test_a_checkpoint_from_before_the_metric_and_preconditioner_options_steps_as_it_was_trained():
    """Such checkpoints ran the Frobenius metric and the one-sided moments; the default is now two-sided."""
    model = tiny_model("bert")
    assert PRISM(model, lr=0.1, max_grad_norm=1.0, **BALANCED).param_groups[0]["preconditioner"] == "two_sided"
    old = dict(BALANCED, metric="frobenius", preconditioner="one_sided")
    trained = PRISM(model, lr=0.1, max_grad_norm=1.0, **old)
    per_example_losses("bert", model, make_batch("bert", b=5, seed=0)).sum().backward()
    trained.step()  # moments exist: one-sided ones only
    saved = trained.state_dict()
    del saved["prism"]["metric"]
    for group in saved["param_groups"]:
        del group["metric"], group["preconditioner"]
    opt = PRISM(model, lr=0.1, max_grad_norm=1.0, **{**BALANCED, "metric": "frobenius"})
    with pytest.warns(UserWarning, match=r"preconditioner='one_sided' \(built with 'two_sided'\)"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["metric"] == "frobenius" and opt.param_groups[0]["preconditioner"] == "one_sided"
    per_example_losses("bert", model, make_batch("bert", b=5, seed=1)).sum().backward()
    opt.step()
    assert opt.state and not any("exp_avg_sq_rows_A" in state for state in opt.state.values())  # still one-sided
