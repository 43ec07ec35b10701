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


def test_dense_max_grad_norm_leaves_ffa_lora_B_with_the_lora_noise():
    """FFA-LoRA's lora_B are LoRA factors: noise std sigma C / b, whatever the head's C_D."""
    sigma, C, C_D, b, lr = 1.0, 0.5, 4.0, 2.0, 1e-6
    model = _ffa_model()
    opt = prism.NaiveDPLoRA(model, lr=lr, noise_multiplier=sigma, max_grad_norm=C, dense_max_grad_norm=C_D,
                            expected_batch_size=b, adaptive=False, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()  # an empty batch: noise only
    moves = {n: (p.detach() - before[n]).flatten() / lr for n, p in model.named_parameters() if p.requires_grad}
    lora_B = torch.cat([v for n, v in moves.items() if "lora_B" in n])
    head = torch.cat([v for n, v in moves.items() if "lora_B" not in n])
    assert abs(lora_B.std().item() / (sigma * C / b) - 1) < 0.2
    assert abs(head.std().item() / (sigma * C_D / b) - 1) < 0.3
