"""Poisson sampling (the sampling the accountant assumes) and micro-batching of logical batches.

Each step includes every example independently with probability q, so logical batches have a
random size (Binomial(N, q), possibly 0). An empty batch must still be followed by
`optimizer.step()`: skipping it would reveal that no example was drawn.

    loader = prism.poisson_data_loader(DataLoader(dataset, collate_fn=collate), sample_rate=q, steps=T)
    for batch in loader:                                   # one logical batch per step
        for micro in prism.micro_batches(batch, max_size=16):
            loss_sum(model, micro).backward()
        optimizer.step()                                   # also for an empty batch
"""

from __future__ import annotations

import warnings
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from . import _validate
from .accounting import steps_from, validate_mechanism
from .noise import entropy_seeded_generator


class PoissonBatchSampler(Sampler[list[int]]):
    """Batches of indices, each index included independently with probability `sample_rate`.

    Args:
        dataset_size: N > 0.
        sample_rate: q in (0, 1].
        steps / epochs: the number of batches (exactly one; steps = ceil(epochs / q)).
        generator: source of the sampling randomness, never derived from the data and unknown to
            an adversary (default: seeded from the OS entropy source; a publicly seeded generator
            reveals which examples were drawn and voids the amplification by subsampling).
    """

    def __init__(self, dataset_size: int, sample_rate: float, steps: int | None = None, *,
                 epochs: float | None = None, generator: torch.Generator | None = None):
        if not isinstance(dataset_size, int) or dataset_size <= 0:
            raise ValueError(f"dataset_size must be an integer > 0, got {dataset_size!r}")
        validate_mechanism(1.0, sample_rate)
        self.dataset_size = dataset_size
        self.sample_rate = float(sample_rate)
        self.steps = steps_from(self.sample_rate, steps, epochs)
        self.generator = entropy_seeded_generator() if generator is None else generator

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.dataset_size

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(self.dataset_size, generator=self.generator) < self.sample_rate
            yield mask.nonzero().squeeze(1).tolist()


def poisson_data_loader(loader: DataLoader, *, sample_rate: float | None = None,
                        expected_batch_size: float | None = None, steps: int | None = None,
                        epochs: float | None = None, generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader over the same dataset and collate function that draws Poisson batches.

    Give the rate q as `sample_rate`, or as `expected_batch_size` / len(dataset). Empty batches
    come out as zero-length batches (the collated structure of one example, cut to length 0).
    """
    size = len(loader.dataset)
    if (sample_rate is None) == (expected_batch_size is None):
        raise ValueError("give exactly one of sample_rate or expected_batch_size")
    if sample_rate is None:
        _validate.positive(expected_batch_size=expected_batch_size)
        sample_rate = expected_batch_size / size
    sampler = PoissonBatchSampler(size, sample_rate, steps, epochs=epochs, generator=generator)
    return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=_EmptySafeCollate(loader),
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


class _EmptySafeCollate:
    def __init__(self, loader: DataLoader):
        self.collate_fn = loader.collate_fn
        self.dataset = loader.dataset

    def __call__(self, examples: list):
        if examples:
            return self.collate_fn(examples)
        return _take(self.collate_fn([self.dataset[0]]), slice(0, 0))


def batch_size_of(batch) -> int:
    """Number of examples in a (possibly nested) batch: the leading size of its first tensor."""
    if torch.is_tensor(batch):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if torch.is_tensor(value) or isinstance(value, (dict, list, tuple)):
            return batch_size_of(value)
    raise TypeError(f"cannot find the batch dimension of a {type(batch).__name__}")


def micro_batches(batch, max_size: int) -> Iterator:
    """Split a logical batch (tensor, dict, list or tuple of tensors) along dim 0 into pieces of at
    most `max_size` examples; an empty batch yields nothing."""
    if not isinstance(max_size, int) or max_size <= 0:
        raise ValueError(f"max_size must be an integer > 0, got {max_size!r}")
    size = batch_size_of(batch)
    for start in range(0, size, max_size):
        yield _take(batch, slice(start, min(start + max_size, size)))


def _take(batch, index: slice):
    if torch.is_tensor(batch):
        return batch[index]
    if isinstance(batch, dict):
        return type(batch)({k: _take(v, index) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_take(v, index) for v in batch)
    return batch



class NonPoissonSampling(RuntimeError):
    """The logical batches do not look Poisson-sampled, so the reported epsilon would be wrong."""


class SamplingCheck:
    """Refuses to account for batches that are visibly not Poisson-sampled.

    Poisson batch sizes are Binomial(N, q) with variance b (1 - q), b = q N. When `WINDOW`
    consecutive logical batches all have the same size although that variance is >= 1 (which
    happens with probability < 1e-7 under Poisson sampling), the loader draws fixed-size batches
    (e.g. DataLoader(batch_size=..., shuffle=True)) and the accountant's epsilon does not apply.
    With allow_non_poisson=True the check is off and a warning says the epsilon is not a guarantee.
    """

    WINDOW = 20

    def __init__(self, plan, allow_non_poisson: bool):
        self.active = plan.sample_rate is not None and not allow_non_poisson
        rate = plan.sample_rate or 0.0
        self.poisson_variance = plan.expected_batch_size * (1 - rate)
        self.sizes: list[int] = []
        if allow_non_poisson and plan.sample_rate is not None:
            warnings.warn("allow_non_poisson=True: the reported epsilon assumes Poisson sampling with rate "
                          f"{plan.sample_rate}; for any other sampler it is NOT a valid privacy guarantee.",
                          UserWarning, stacklevel=4)

    def observe(self, batch_size: int) -> None:
        if not self.active:
            return
        self.sizes = (self.sizes + [int(batch_size)])[-self.WINDOW:]
        if len(self.sizes) == self.WINDOW and len(set(self.sizes)) == 1 and self.poisson_variance >= 1:
            raise NonPoissonSampling(
                f"the last {self.WINDOW} logical batches all had {self.sizes[0]} examples; Poisson sampling gives "
                f"sizes with variance {self.poisson_variance:.1f}. The epsilon would be wrong: draw batches with "
                "prism.PoissonBatchSampler / prism.poisson_data_loader (or pass allow_non_poisson=True to accept "
                "an epsilon that is not a guarantee).")

    def state_dict(self) -> dict:
        return {"sizes": list(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        self.sizes = list(state["sizes"])
