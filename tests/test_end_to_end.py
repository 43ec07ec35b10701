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


def test_the_readme_usage_flow():
    """Poisson DataLoader + micro-batches + target epsilon, as the README shows it."""
    from torch.utils.data import DataLoader, TensorDataset

    import prism

    g = torch.Generator().manual_seed(2)
    X, y = _token_halves_task(400, 8, g)
    model = tiny_model("bert", r=2, hidden=16, num_labels=2, dtype=torch.float32)
    opt = prism.PRISM(model, lr=0.01, max_grad_norm=1.0, target_epsilon=8.0, delta=1e-5,
                      expected_batch_size=40, dataset_size=len(X), steps=12, loss_reduction="sum")
    loader = opt.poisson_data_loader(DataLoader(TensorDataset(X, y)))  # the optimizer's rate and steps
    opt.check_examples((X[:4], y[:4]), lambda m, batch: F.cross_entropy(m(input_ids=batch[0]).logits, batch[1],
                                                                        reduction="none"))
    seen = 0
    for ids, labels in loader:
        for micro_ids, micro_labels in prism.micro_batches((ids, labels), 16):
            F.cross_entropy(model(input_ids=micro_ids).logits, micro_labels, reduction="sum").backward()
            seen += len(micro_ids)
        opt.step()
    epsilon, delta = opt.privacy_spent()
    assert opt.steps_taken == 12 and seen > 0 and delta == 1e-5
    assert 7.0 < epsilon <= 8.0  # calibrated to the target for exactly these steps
