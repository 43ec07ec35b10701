"""Bad input, one table: each case raises an error that names the problem and the fix."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

import prism
import prism.hf
from helpers import lora_layers, make_batch, tiny_model
from prism import PRISM, NonPoissonSampling, calibrate_noise_multiplier

BASE = dict(lr=0.01, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)


def build(model=None, **overrides):
    return lambda: PRISM(tiny_model("bert") if model is None else model(), **{**BASE, **overrides})


def several_adapters():
    model = tiny_model("llama")
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian"))
    model.base_model.set_adapter(["default", "second"])
    return model


def rank_deficient():
    model = tiny_model("bert", r=3)
    with torch.no_grad():
        lora_A, _, _ = lora_layers(model)[1]
        lora_A.weight[2] = lora_A.weight[0]
    return model


def fixed_size_batches():
    """Shuffled fixed-size batches (not Poisson) with accounting: refused within 40 steps."""
    model = tiny_model("bert")
    opt = PRISM(model, **{**BASE, "expected_batch_size": 4, "dataset_size": 100, "delta": 1e-5})
    batch = make_batch("bert", 4)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        loss.backward()
        opt.step()


def batch_mean_loss_through_the_trainer():
    """A 'per-example' loss that is really one number for the whole micro-batch."""
    model = tiny_model("bert")
    opt = PRISM(model, **BASE)
    coupled = lambda outputs, labels: torch.nn.functional.cross_entropy(outputs.logits, labels)  # noqa: E731
    prism.hf.per_example_compute_loss(opt, coupled, model, make_batch("bert", 4))


class _TiedHead(torch.nn.Module):
    """An output layer tied to the embedding, registered before it."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(8, 12, bias=False)
        self.proj = torch.nn.Linear(8, 8)
        self.emb = torch.nn.Embedding(12, 8)
        self.emb.weight = self.head.weight

    def forward(self, ids):
        return self.head(self.proj(self.emb(ids)))


def trainable_tied_weight():
    model = get_peft_model(_TiedHead(), LoraConfig(r=2, target_modules=["proj"], init_lora_weights="pissa"))
    model.base_model.model.head.weight.requires_grad_(True)
    return model


CASES = {
    "model without LoRA layers": (build(lambda: torch.nn.Sequential(torch.nn.Linear(3, 3))), ValueError,
                                  "get_peft_model"),
    "several active adapters": (build(several_adapters), ValueError, "several LoRA adapters"),
    "zero factor (peft's default init)": (build(lambda: tiny_model("bert", init=True)), ValueError,
                                          'init_lora_weights="pissa"'),
    "rank-deficient factor": (build(rank_deficient), ValueError, "rank-deficient"),
    "r > min(m, n)": (build(lambda: tiny_model("bert", r=20, hidden=16, init="gaussian")), ValueError,
                      "exceeds min"),
    "expected batch size 0": (build(expected_batch_size=0), ValueError, "expected_batch_size"),
    "expected batch size inf": (build(expected_batch_size=math.inf), ValueError, "expected_batch_size"),
    "negative noise multiplier": (build(noise_multiplier=-0.1), ValueError, "noise_multiplier"),
    "max grad norm 0": (build(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    "dense max grad norm negative": (build(dense_max_grad_norm=-1.0), ValueError, "dense_max_grad_norm"),
    "dense max grad norm nan": (build(dense_max_grad_norm=math.nan), ValueError, "dense_max_grad_norm"),
    "dense max grad norm 1e9 times C": (build(dense_max_grad_norm=1e9), ValueError, "closer"),
    "negative learning rate": (build(lr=-1.0), ValueError, "lr"),
    "learning rate as a string": (build(lr="0.1"), (ValueError, TypeError), "lr"),
    "beta of 1": (build(betas=(0.9, 1.0)), ValueError, "betas"),
    "unknown loss reduction": (build(loss_reduction="token_mean"), ValueError, "loss_reduction"),
    "unknown floor mode": (build(floor_mode="matrix"), ValueError, "floor_mode"),
    "unknown metric": (build(metric="spectral"), ValueError, "metric"),
    "max condition 0": (build(max_condition=0), ValueError, "max_condition"),
    "generator of the wrong type": (build(generator=0), (ValueError, TypeError), "generator"),
    "delta >= 1/N": (build(dataset_size=100, delta=0.02), ValueError, "1/N"),
    "delta >= 1/N, N implied by the sampling rate": (build(sample_rate=0.1, expected_batch_size=10, delta=0.05),
                                                     ValueError, "1/N"),
    "tied trainable weight": (build(trainable_tied_weight), ValueError, "tied weights"),
    "init_balanced_lora with r > min(m, n)": (
        lambda: prism.init_balanced_lora(tiny_model("bert", r=20, hidden=16, init="gaussian")), ValueError,
        "exceeds min"),
    "unreachable target epsilon": (lambda: calibrate_noise_multiplier(1e-4, 1e-10, 1.0, 10 ** 4), ValueError,
                                   "unreachable"),
    "parameters instead of the model": (lambda: PRISM(tiny_model("bert").parameters(), **BASE), TypeError,
                                        "peft model"),
    "non-Poisson sampler with accounting": (fixed_size_batches, NonPoissonSampling, "Poisson"),
    "batch-reduced loss in the Trainer path": (batch_mean_loss_through_the_trainer, ValueError,
                                               "one loss per example"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_naming_the_fix(case):
    action, error, match = CASES[case]
    with pytest.raises(error, match=match):
        action()
