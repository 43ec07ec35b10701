"""The torch.optim contract and every misuse prism must refuse loudly."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from helpers import lora_layers, lora_Z, make_batch, per_example_losses, select, tiny_model
from prism import PRISM, NaiveDPLoRA, init_balanced_lora

BASE = dict(lr=0.01, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)


def _micro_step(model, opt, batch, kind="bert"):
    per_example_losses(kind, model, batch).mean().backward()
    opt.step()


@pytest.mark.parametrize("cls", [PRISM, NaiveDPLoRA])
def test_untrainable_parameters_are_refused_by_name(cls):
    model = tiny_model("bert")
    model.base_model.model.bert.embeddings.LayerNorm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="embeddings.LayerNorm.weight"):
        cls(model, **BASE)


def test_dora_is_refused():
    from transformers import BertConfig, BertModel
    model = get_peft_model(BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=8)),
                           LoraConfig(r=2, target_modules=["query"], use_dora=True))
    with pytest.raises(ValueError, match="use_dora=False"):
        PRISM(model, **BASE)


def test_init_balanced_lora_fixes_a_zero_init_without_changing_outputs():
    model = tiny_model("bert", init=True)  # peft's default: lora_B = 0, refused (tests/test_bad_input.py)
    batch = make_batch("bert", b=3)
    before = per_example_losses("bert", model, batch)
    init_balanced_lora(model, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(per_example_losses("bert", model, batch), before)
    assert all((B.weight @ A.weight).norm() > 0.1 for A, B, _ in lora_layers(model))
    PRISM(model, **BASE)  # accepted now
    NaiveDPLoRA(tiny_model("bert", init=True), **BASE)  # the naive baseline accepts lora_B = 0


def test_noise_std_is_sigma_C_over_expected_batch():
    opt = PRISM(tiny_model("bert"), **{**BASE, "noise_multiplier": 0.8, "max_grad_norm": 2.0, "expected_batch_size": 16})
    assert opt.noise_std == pytest.approx(0.1)
    assert "PRISM(lora_modules=4, dense_modules=1" in repr(opt)


@pytest.mark.parametrize("cls", [PRISM, NaiveDPLoRA])
def test_mean_and_sum_reductions_give_the_same_clipped_sums(cls):
    batch = make_batch("bert", b=4, seed=3)
    sums = []
    for reduction in ("mean", "sum"):
        model = tiny_model("bert")
        opt = cls(model, **{**BASE, "loss_reduction": reduction, "max_grad_norm": 0.3})
        losses = per_example_losses("bert", model, batch)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
        sums.append([s for module_sums in opt.clipped_sums().values() for s in module_sums])
    for a, b in zip(*sums):
        torch.testing.assert_close(a, b)


def test_a_non_finite_example_is_dropped_and_counted():
    batch = make_batch("bert", b=4, seed=3)
    sums = []
    for poisoned in (False, True):
        model = tiny_model("bert")
        opt = PRISM(model, **BASE)
        losses = per_example_losses("bert", model, batch)
        weights = torch.tensor([1.0, 1.0, float("nan") if poisoned else 0.0, 1.0], dtype=torch.float64)
        (weights * losses).sum().backward()
        assert opt.stats.nonfinite == int(poisoned) and opt.stats.examples == 4
        sums.append([s for module_sums in opt.clipped_sums().values() for s in module_sums])
        opt.step()
        assert all(torch.isfinite(z).all() for z in lora_Z(model))
    for a, b in zip(*sums):
        torch.testing.assert_close(a, b)


def test_backward_twice_through_one_forward_is_refused():
    model = tiny_model("bert")
    opt = PRISM(model, **BASE)
    loss = per_example_losses("bert", model, make_batch("bert", b=2)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="count twice"):
        loss.backward()
    assert opt.stats.examples == 2


def test_gradients_without_per_example_information_are_refused():
    model = tiny_model("bert")
    opt = PRISM(model, **BASE)
    opt.remove_hooks()
    per_example_losses("bert", model, make_batch("bert", b=2)).sum().backward()
    with pytest.raises(RuntimeError, match="not be private"):
        opt.step()


def test_gradient_accumulation_equals_one_big_batch():
    batch = make_batch("bert", b=6, seed=4)
    results = []
    for micro in (6, 2):
        model = tiny_model("bert")
        opt = PRISM(model, **{**BASE, "expected_batch_size": 6, "max_grad_norm": 0.2},
                    generator=torch.Generator().manual_seed(1))
        for start in range(0, 6, micro):
            per_example_losses("bert", model, select(batch, slice(start, start + micro))).sum().backward()
        assert opt.stats.examples == 6 and opt.stats.backward_passes == 6 // micro
        opt.step()
        results.append(lora_Z(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_zero_grad_discards_the_accumulated_step_and_step_clears_grads():
    model = tiny_model("bert")
    opt = PRISM(model, **BASE)
    per_example_losses("bert", model, make_batch("bert", b=2)).sum().backward()
    opt.zero_grad()
    assert opt.stats.examples == 0 and opt.clipped_sums() == {}
    per_example_losses("bert", model, make_batch("bert", b=2)).sum().backward()
    opt.step()
    assert all(p.grad is None for p in opt.param_groups[0]["params"])


@pytest.mark.parametrize("adaptive, preconditioner", [(True, "two_sided"), (True, "one_sided"), (False, "two_sided")])
def test_empty_batches_without_noise_change_nothing(adaptive, preconditioner):
    """Without noise the floor is 0 and every row moment is 0: the two-sided step must still be 0, not 0/0."""
    model = tiny_model("bert")
    opt = PRISM(model, **{**BASE, "noise_multiplier": 0.0, "adaptive": adaptive, "preconditioner": preconditioner})
    before = lora_Z(model)
    opt.step()
    for a, b in zip(before, lora_Z(model)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls, extra", [(PRISM, {}), (PRISM, dict(momentum_shrinkage=True)), (NaiveDPLoRA, {})],
                         ids=["prism", "prism-shrinkage", "naive"])
def test_state_dict_resume_equals_uninterrupted_run(cls, extra):
    def run(model, opt, steps):
        for step in steps:
            _micro_step(model, opt, make_batch("bert", b=4, seed=step))

    model = tiny_model("bert")
    opt = cls(model, **BASE, **extra, generator=torch.Generator().manual_seed(0))
    run(model, opt, range(3))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, range(3, 5))

    resumed = tiny_model("bert", seed=123)  # different weights: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    resumed_opt = cls(resumed, **BASE, **extra, generator=torch.Generator().manual_seed(999))
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.steps_taken == 3
    run(resumed, resumed_opt, range(3, 5))
    for a, b in zip(lora_Z(model), lora_Z(resumed)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("change", [dict(noise_multiplier=0.5), dict(dense_max_grad_norm=3.0)])
def test_resume_with_other_privacy_settings_is_refused(change):
    opt = PRISM(tiny_model("bert"), **BASE)
    other = PRISM(tiny_model("bert"), **{**BASE, **change})
    with pytest.raises(ValueError, match=f"saved with {next(iter(change))}"):
        other.load_state_dict(opt.state_dict())


def test_a_checkpoint_from_before_dense_max_grad_norm_loads_as_a_plain_joint_clip():
    saved = PRISM(tiny_model("bert"), **BASE).state_dict()
    del saved["prism"]["dense_max_grad_norm"]
    PRISM(tiny_model("bert"), **BASE).load_state_dict(saved)
    with pytest.raises(ValueError, match="dense_max_grad_norm=1.0, this optimizer has 3.0"):
        PRISM(tiny_model("bert"), **{**BASE, "dense_max_grad_norm": 3.0}).load_state_dict(saved)


def test_bf16_parameters_keep_fp32_state_through_a_round_trip():
    model = tiny_model("bert", dtype=torch.bfloat16)
    opt = PRISM(model, **BASE)
    for step in range(2):
        _micro_step(model, opt, make_batch("bert", b=4, seed=step))
    lora_B = lora_layers(model)[0][1].weight
    assert lora_B.dtype == torch.bfloat16
    assert opt.state[lora_B]["exp_avg_A"].dtype == torch.float32
    again = PRISM(model, **BASE)
    again.load_state_dict(opt.state_dict())
    assert again.state[lora_B]["exp_avg_sq_A"].dtype == torch.float32
    assert again.state[lora_B]["exp_avg_sq_rows_A"].dtype == torch.float32  # two-sided (the default)
    assert all(torch.isfinite(z).all() for z in lora_Z(model))


@pytest.mark.parametrize("cls", [PRISM, NaiveDPLoRA])
def test_bf16_parameters_accumulate_updates_below_their_rounding_step(cls):
    """Steps of lr = 1e-4 vanish when rounded to bf16 one at a time; fp32 masters keep them."""
    model = tiny_model("bert", dtype=torch.bfloat16, init="pissa" if cls is PRISM else True)
    head = model.base_model.model.classifier.modules_to_save["default"].weight
    start = head.detach().float().clone()
    opt = cls(model, **{**BASE, "lr": 1e-4, "noise_multiplier": 0.0})
    batch = make_batch("bert", b=4)
    for _ in range(30):
        _micro_step(model, opt, batch)
    master = opt.state[head]["fp32_master"]
    assert master.dtype == torch.float32 and torch.equal(master.to(torch.bfloat16), head.detach())
    moved = (master - start).abs().mean().item()
    assert moved > 0.5 * 30 * 1e-4  # Adam moves each coordinate by about lr per step
    assert (head.detach().float() - start).abs().mean().item() > 0.5 * moved


def test_a_master_copy_yields_to_weights_written_from_outside():
    model = tiny_model("bert", dtype=torch.bfloat16)
    opt = PRISM(model, **{**BASE, "noise_multiplier": 0.0})
    _micro_step(model, opt, make_batch("bert", b=4))
    head = model.base_model.model.classifier.modules_to_save["default"].weight
    with torch.no_grad():
        head.fill_(0.5)
    assert torch.equal(opt.value_of(head, torch.float32), torch.full_like(head, 0.5, dtype=torch.float32))


def test_lr_scheduler_drives_the_step():
    model = tiny_model("bert")
    opt = PRISM(model, **{**BASE, "noise_multiplier": 0.0})
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    before = lora_Z(model)
    _micro_step(model, opt, make_batch("bert", b=4))
    scheduler.step()
    _micro_step(model, opt, make_batch("bert", b=4))
    assert opt.param_groups[0]["lr"] == 0.0
    for a, b in zip(before, lora_Z(model)):
        torch.testing.assert_close(a, b)


def test_dense_dp_aware_floor_damps_noise_level_coordinates():
    from prism.functional import StepConfig, dense_step
    param = torch.zeros(3, dtype=torch.float64)
    grad = torch.tensor([1e-6, 1e-6, 10.0], dtype=torch.float64)
    plain = StepConfig(lr=0.1, noise_std=1.0, expected_batch_size=1, adaptive=True, betas=(0.9, 0.999), eps=1e-12,
                       weight_decay=0.0)
    floored = StepConfig(**{**plain.__dict__, "floor_factor": 0.5})
    adamw = dense_step(param, grad, {}, plain)
    dp_aware = dense_step(param, grad, {}, floored)
    torch.testing.assert_close(adamw, torch.full((3,), -0.1, dtype=torch.float64))  # Adam: full lr everywhere
    torch.testing.assert_close(dp_aware[:2], torch.full((2,), -0.1 * 1e-6 / 0.5 ** 0.5, dtype=torch.float64))
    torch.testing.assert_close(dp_aware[2], torch.tensor(-0.1, dtype=torch.float64))  # signal above the floor
