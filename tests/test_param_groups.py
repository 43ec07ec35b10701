"""Parameter groups: the head gets its own learning rate and weight decay; clipping and noise stay joint."""

import pytest
import torch

from prism import PRISM, NaiveDPLoRA

from helpers import lora_Z, make_batch, per_example_losses, tiny_model

BASE = dict(lr=0.05, noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=4, adaptive=False,
            generator=None)


def _head(model):
    return model.base_model.model.classifier.modules_to_save["default"]


def _one_step(cls, groups, *, noise_multiplier=0.0, init="pissa"):
    model = tiny_model("bert", init=init)
    generator = torch.Generator().manual_seed(7)
    opt = cls(model, **{**BASE, "noise_multiplier": noise_multiplier, "generator": generator},
              groups=groups(model) if groups else None)
    head_before = _head(model).weight.detach().clone()
    per_example_losses("bert", model, make_batch("bert", b=4)).mean().backward()
    opt.step()
    return model, opt, _head(model).weight.detach() - head_before


@pytest.mark.parametrize("cls", [PRISM, NaiveDPLoRA])
@pytest.mark.parametrize("noise_multiplier", [0.0, 1.0])
def test_the_heads_own_learning_rate_scales_its_step_and_nothing_else(cls, noise_multiplier):
    """SGD: the head's step is proportional to its group's lr; the clip (over the whole example) and
    the noise (one stream, drawn in the same order) are the same, so the LoRA step is unchanged."""
    init = "pissa" if cls is PRISM else True
    model_1, _, head_1 = _one_step(cls, None, noise_multiplier=noise_multiplier, init=init)
    model_3, opt, head_3 = _one_step(cls, lambda m: [{"params": _head(m).parameters(), "lr": 3 * BASE["lr"]}],
                                     noise_multiplier=noise_multiplier, init=init)
    assert len(opt.param_groups) == 2
    assert head_1.abs().max() > 0
    torch.testing.assert_close(head_3, 3 * head_1)
    for z_1, z_3 in zip(lora_Z(model_1), lora_Z(model_3)):
        torch.testing.assert_close(z_1, z_3, rtol=1e-10, atol=1e-12)


def test_a_frozen_head_group_leaves_the_head_alone_while_lora_trains():
    model, _, head_step = _one_step(PRISM, lambda m: [{"params": list(_head(m).parameters()), "lr": 0.0,
                                                       "weight_decay": 0.1}])
    assert torch.equal(head_step, torch.zeros_like(head_step))
    fresh = lora_Z(tiny_model("bert"))
    assert any(not torch.allclose(a, b) for a, b in zip(fresh, lora_Z(model)))


def test_a_scheduler_drives_each_group_and_the_groups_survive_a_checkpoint():
    model = tiny_model("bert")
    opt = PRISM(model, **BASE, groups=[{"params": _head(model).parameters(), "lr": 0.2}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, [lambda step: 0.5, lambda step: 0.1])
    per_example_losses("bert", model, make_batch("bert", b=4)).mean().backward()
    opt.step()
    scheduler.step()
    assert [group["lr"] for group in opt.param_groups] == pytest.approx([0.025, 0.02])
    opt.remove_hooks()
    with pytest.warns(UserWarning, match="already took 1 private steps"):
        again = PRISM(model, **BASE, groups=[{"params": _head(model).parameters(), "lr": 0.2}])
    again.load_state_dict(opt.state_dict())
    assert [group["lr"] for group in again.param_groups] == pytest.approx([0.025, 0.02])


def test_lora_factors_of_one_pair_in_two_groups_are_refused():
    model = tiny_model("bert")
    lora_A = next(p for name, p in model.named_parameters() if "lora_A" in name)
    with pytest.raises(ValueError, match="lora_A and lora_B are in different parameter groups"):
        PRISM(model, **BASE, groups=[{"params": [lora_A], "lr": 0.1}])


@pytest.mark.parametrize("bad, message", [
    (lambda m: [{"params": _head(m).parameters(), "max_grad_norm": 5.0}], "may set only"),
    (lambda m: [{"params": [m.base_model.model.bert.embeddings.word_embeddings.weight]}], "does not train"),
    (lambda m: [{"params": _head(m).parameters()}, {"params": [_head(m).weight]}], "in groups\\[0\\] and groups\\[1\\]"),
    (lambda m: [_head(m).weight], "must be a dict with 'params'"),
])
def test_bad_groups_are_refused_by_name(bad, message):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=message):
        PRISM(model, **BASE, groups=bad(model))


def test_add_param_group_after_construction_points_to_groups():
    model = tiny_model("bert")
    opt = PRISM(model, **BASE)
    with pytest.raises(ValueError, match="groups="):
        opt.add_param_group({"params": _head(model).parameters(), "lr": 1e-3})
