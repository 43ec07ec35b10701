"""The Poisson sampler (the sampling the accountant assumes), for the plain loop and the Trainer alike.

Each draw includes every example independently with probability q, so logical batches have a
random size (Binomial(N, q), possibly 0). One class, `PoissonBatchSampler`, serves both users:
the plain loop takes one index list per draw (`poisson_data_loader`), the Hugging Face Trainer
takes each draw cut into its gradient-accumulation micro-batches (`micro_batches=k`); cutting
changes the grouping, never the indices drawn.
"""

from __future__ import annotations

from numbers import Integral
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .. import _validate, distributed
from ..accounting import steps_from, validate_mechanism
from ..pipeline.noise import entropy_seeded_generator
from .batches import EmptySafeCollate


class PoissonBatchSampler(Sampler[list[int]]):
    """Poisson draws of indices, each index included independently with probability `sample_rate`.

    Every iteration makes `steps` draws. A draw is yielded as one index list, or with
    `micro_batches=k` as k lists: the draw cut in order into k chunks of near-equal size
    (split_evenly; chunks may be empty), one logical step of k accumulated micro-batches.

    The randomness comes from exactly one source:
    - `generator` (default: seeded from the OS entropy source): the draws follow its stream. A
      publicly seeded generator reveals which examples were drawn and voids the amplification by
      subsampling.
    - `seed`: draw t uses a generator keyed on (seed, t) alone, so a sampler whose `next_step` is t
      (`start_step=t`, or set later, as the Trainer integration does on resume) draws exactly what
      an uninterrupted one draws from its draw t on. For reproducible runs only: the same warning
      applies to a seed anyone else knows.
    `next_step` is the index of the next draw; every draw advances it.

    Under torch.distributed with W ranks (build it on every rank, after init_process_group), every
    rank draws the same batch, from rank 0's seed or generator state (broadcast here), and keeps
    only its share: chunk `rank` of the draw cut in order into W near-equal chunks (split_evenly),
    which it then cuts into its micro-batches. The shares are disjoint and together are the draw;
    a share may be empty.

    Args:
        dataset_size: N > 0.
        sample_rate: q in (0, 1].
        steps / epochs: draws per iteration (exactly one; steps = ceil(epochs / q)).
        generator: a torch.Generator (not with `seed`).
        seed: an integer >= 0 (not with `generator`).
        micro_batches: k >= 1, index lists per draw.
        start_step: the index of the first draw (>= 0).
    """

    def __init__(self, dataset_size: int, sample_rate: float, steps: int | None = None, *,
                 epochs: float | None = None, generator: torch.Generator | None = None, seed: int | None = None,
                 micro_batches: int = 1, start_step: int = 0):
        _whole_numbers(1, dataset_size=dataset_size, micro_batches=micro_batches)
        _whole_numbers(0, start_step=start_step, **({} if seed is None else {"seed": seed}))
        validate_mechanism(1.0, sample_rate)
        if seed is not None and generator is not None:
            raise ValueError("give the sampler a generator or a seed, not both: a seed keys every draw on its own.")
        self.dataset_size = dataset_size
        self.sample_rate = float(sample_rate)
        self.steps = steps_from(self.sample_rate, steps, epochs)
        self.micro_batches = micro_batches
        self.next_step = start_step
        self.ranks, self.rank = distributed.world()
        self.seed = distributed.broadcast_object(seed)
        self.generator = None if self.seed is not None else distributed.broadcast_generator(
            entropy_seeded_generator() if generator is None else generator)

    @property
    def expected_batch_size(self) -> float:
        """b = q N, the expected size of a draw (all ranks together)."""
        return self.sample_rate * self.dataset_size

    def __len__(self) -> int:
        return self.steps * self.micro_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            distributed.check_same_world(self.ranks, "this PoissonBatchSampler")
            draw = poisson_indices(self.dataset_size, self.sample_rate, self._generator_of(self.next_step))
            self.next_step += 1
            yield from split_evenly(split_evenly(draw, self.ranks)[self.rank], self.micro_batches)

    def _generator_of(self, step: int) -> torch.Generator:
        """The generator of draw `step`: the one stream, or a fresh one keyed on (seed, step)."""
        if self.seed is None:
            return self.generator
        key = np.random.SeedSequence([self.seed, step]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(key) >> 1)


def _whole_numbers(minimum: int, **values) -> None:
    """Raise unless every value is an integer >= `minimum`, naming the argument."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def poisson_indices(dataset_size: int, sample_rate: float, generator: torch.Generator) -> list[int]:
    """One Poisson draw: every index in range(dataset_size) independently with probability q."""
    # float64: float32 draws are multiples of 2^-24, which would include examples slightly more often
    mask = torch.rand(dataset_size, generator=generator, dtype=torch.float64) < sample_rate
    return mask.nonzero().squeeze(1).tolist()


def split_evenly(items: list, parts: int) -> list[list]:
    """`items` in order, cut into `parts` chunks whose sizes differ by at most one (some may be empty)."""
    size, extra = divmod(len(items), parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


def poisson_data_loader(loader: DataLoader, *, sample_rate: float | None = None,
                        expected_batch_size: float | None = None, steps: int | None = None,
                        epochs: float | None = None, generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader over the same dataset and collate function that draws Poisson batches.

    Give the rate q as `sample_rate`, or as `expected_batch_size` / len(dataset) (under
    torch.distributed: the GLOBAL rate and expected size; each rank gets its share of every draw,
    see PoissonBatchSampler). Empty batches come out as `EmptyBatch()`: skip the forward pass,
    still call `optimizer.step()`.
    """
    size = len(loader.dataset)
    if (sample_rate is None) == (expected_batch_size is None):
        raise ValueError("give exactly one of sample_rate or expected_batch_size")
    if sample_rate is None:
        _validate.positive(expected_batch_size=expected_batch_size)
        sample_rate = expected_batch_size / size
    sampler = PoissonBatchSampler(size, sample_rate, steps, epochs=epochs, generator=generator)
    return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=EmptySafeCollate(loader.collate_fn),
                      **worker_settings(loader))


def worker_settings(loader: DataLoader) -> dict:
    """`loader`'s worker and pinning options, for a DataLoader that draws other batches from its dataset.

    `in_order` is left at True on purpose: out-of-order workers could interleave the micro-batches
    of different Poisson draws, and each logical batch must be exactly one draw.
    """
    return dict(num_workers=loader.num_workers, pin_memory=loader.pin_memory, timeout=loader.timeout,
                worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
                prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                pin_memory_device=loader.pin_memory_device)
