"""benchmarks.llm_ablations: each ablation is the step it claims to be."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import prism
from benchmarks import llm_ablations
from prism.pipeline.retract import balance


def _model(factors=None):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    if factors is not None:  # lora_alpha = r: peft's scaling is 1, so Z = A B^T is the whole update
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(factors[0])
            layer.lora_A["default"].weight.copy_(factors[1].T)
    return model, layer


def _factors(layer):
    return layer.lora_B["default"].weight.detach().clone(), layer.lora_A["default"].weight.detach().T.clone()


def _train(cls, factors, steps=4):
    model, layer = _model(factors)
    optimizer = cls(model, lr=0.05, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=16,
                    dataset_size=100, allow_non_poisson=True)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 12, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return _factors(layer)


@pytest.fixture
def balanced_start():
    return balance(*_factors(_model()[1]))


@pytest.mark.filterwarnings("ignore")
def test_factor_step_is_naive_dp_adam_without_noise(balanced_start):
    """Without noise, PRISMFactorStep (balanced metric at balanced factors, Adam, additive update) takes
    exactly naive DP-Adam's steps: the ablation differs from naive in the noise alone."""
    naive, ablation = _train(prism.NaiveDPLoRA, balanced_start), _train(llm_ablations.PRISMFactorStep, balanced_start)
    for a, b, start in zip(naive, ablation, balanced_start):
        assert not torch.allclose(a, start, atol=1e-3)  # it trained
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_elementwise_adam_retracts_and_differs_from_the_factor_step(balanced_start):
    A, B = _train(llm_ablations.PRISMElementwiseAdam, balanced_start)
    torch.testing.assert_close(A.T @ A, B.T @ B, rtol=1e-4, atol=1e-5)  # re-balanced after every step
    A_step, B_step = _train(llm_ablations.PRISMFactorStep, balanced_start)
    assert not torch.allclose(A_step.T @ A_step, B_step.T @ B_step, atol=1e-3)  # the additive step is not
    assert torch.allclose(A @ B.T, A_step @ B_step.T, atol=0.05)  # but Z moves alike (first order)
    assert not torch.allclose(A @ B.T, A_step @ B_step.T, atol=1e-5)
