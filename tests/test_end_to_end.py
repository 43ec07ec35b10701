"""A tiny private fine-tune with Poisson sampling that clearly learns a learnable task."""

import torch
from torch.nn import functional as F

from helpers import tiny_model
from prism import PRISM


def _token_halves_task(n, T, generator):
    """Class 0 draws tokens from 1..23, class 1 from 17..39: learnable, not trivially separable."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    return torch.randint(1, 24, (n, T), generator=generator) + 16 * labels[:, None], labels


def test_private_fine_tune_learns():
    g = torch.Generator().manual_seed(0)
    X, y = _token_halves_task(4096, 8, g)
    X_test, y_test = _token_halves_task(512, 8, g)
    model = tiny_model("bert", r=4, hidden=32, num_labels=2, dtype=torch.float32)
    q = 256 / len(X)
    opt = PRISM(model, lr=0.03, noise_multiplier=0.7, max_grad_norm=1.0, expected_batch_size=q * len(X),
                loss_reduction="sum", generator=torch.Generator().manual_seed(1))

    def accuracy():
        with torch.no_grad():
            return (model(input_ids=X_test).logits.argmax(-1) == y_test).float().mean().item()

    start = accuracy()
    losses = []
    for _ in range(60):
        batch = (torch.rand(len(X), generator=g) < q).nonzero().squeeze(1)  # Poisson sampling
        loss = F.cross_entropy(model(input_ids=X[batch]).logits, y[batch], reduction="sum")
        loss.backward()
        losses.append(loss.item() / len(batch))
        opt.step()
    assert start < 0.6
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert accuracy() > 0.9
