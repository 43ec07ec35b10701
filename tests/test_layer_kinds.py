"""Base-layer kinds come from one registry (prism.layers): what an adapter's base layer is decides
orientation and whether an init may rewrite it, and an unknown kind is refused by name."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import prism
from prism.layers import BaseKind, base_kind_of, register_base_kind, supported_kinds

from helpers import make_batch, per_example_losses, tiny_model


class ReadOnlyLinear(nn.Linear):
    """A linear layer whose weight must not be written (as a quantized one), registered as its own kind."""


READ_ONLY = BaseKind(name="read-only linear (test)", fan_in_fan_out=False, may_rewrite_base=False,
                     features=lambda layer: (layer.in_features, layer.out_features),
                     applied_weight=lambda layer: layer.weight)
register_base_kind(ReadOnlyLinear, READ_ONLY)


class _Tagger(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = proj

    def forward(self, input_ids):
        return self.proj(self.embed(input_ids)).sum(1)


def _peft(proj):
    torch.manual_seed(0)
    return get_peft_model(_Tagger(proj), LoraConfig(r=2, target_modules=["proj"], init_lora_weights="gaussian"))


def test_the_most_derived_registered_kind_decides():
    assert base_kind_of(ReadOnlyLinear(4, 4)) is READ_ONLY
    assert base_kind_of(nn.Linear(4, 4)).name == "nn.Linear"
    assert base_kind_of(nn.Conv2d(1, 1, 1)) is None
    assert "read-only linear (test)" in supported_kinds()
    with pytest.raises(ValueError, match="already registered"):
        register_base_kind(ReadOnlyLinear, READ_ONLY)


def test_an_init_may_not_rewrite_a_base_its_kind_protects_but_training_works():
    model = _peft(ReadOnlyLinear(8, 8))
    with pytest.raises(ValueError, match="cannot compensate a read-only linear \\(test\\) base weight"):
        prism.init_balanced_lora(model)
    prism.init_balanced_lora(model, compensate_base=False)
    opt = prism.PRISM(model, lr=0.1, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=3)
    assert opt.pairs[0].base_kind is READ_ONLY
    before = model.base_model.model.proj.lora_B["default"].weight.detach().clone()
    model(torch.randint(0, 20, (3, 5))).square().sum(1).mean().backward()
    opt.step()
    assert not torch.equal(before, model.base_model.model.proj.lora_B["default"].weight)


def test_gpt2_conv1d_is_its_own_kind_and_a_compensated_init_keeps_the_output():
    model = tiny_model("gpt2", init=True)
    batch = make_batch("gpt2", b=3)
    before = per_example_losses("gpt2", model, batch)
    prism.init_balanced_lora(model, generator=torch.Generator().manual_seed(0))
    pairs, _ = prism.find_trainables(model)
    assert {pair.base_kind.name for pair in pairs} == {"GPT-2 Conv1D"}
    assert all(pair.base_kind.fan_in_fan_out for pair in pairs)
    torch.testing.assert_close(per_example_losses("gpt2", model, batch), before)


def test_an_unregistered_base_layer_is_refused_with_the_supported_kinds():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 4)
            self.proj = nn.Conv1d(4, 4, 1)

        def forward(self, input_ids):
            return self.proj(self.embed(input_ids).transpose(1, 2)).sum((1, 2))

    model = get_peft_model(Conv(), LoraConfig(r=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match="LoRA on Conv1d layers is not supported.*nn.Linear"):
        prism.PRISM(model, lr=0.1, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=3)
