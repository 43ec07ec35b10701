"""FFA-LoRA (lora_A frozen, lora_B trained): NaiveDPLoRA trains it privately, PRISM refuses it."""

import pytest
import torch

import prism
from helpers import make_batch, per_example_losses, tiny_model


def _ffa_model():
    model = tiny_model("bert", init=True, dtype=torch.float32)
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
    return model


def test_naive_trains_lora_B_of_frozen_lora_A_as_dense_layers():
    model = _ffa_model()
    pairs, dense = prism.find_trainables(model, frozen_lora_A=True)
    assert pairs == [] and sum(".lora_B" in d.name for d in dense) == 4
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    opt = prism.NaiveDPLoRA(model, lr=1e-2, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=8,
                            loss_reduction="sum")
    per_example_losses("bert", model, make_batch("bert", 8)).sum().backward()
    opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(not torch.equal(params[n], v) for n, v in trained.items())


def test_prism_and_the_default_refuse_a_frozen_lora_A():
    with pytest.raises(ValueError, match="lora_A and lora_B must both be trainable"):
        prism.find_trainables(_ffa_model())
    with pytest.raises(ValueError, match="lora_A and lora_B must both be trainable"):
        prism.PRISM(_ffa_model(), lr=1e-2, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8)
