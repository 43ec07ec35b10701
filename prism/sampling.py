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

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from . import _validate, distributed
from .accounting import steps_from, validate_mechanism
from .pipeline.noise import entropy_seeded_generator


class PoissonBatchSampler(Sampler[list[int]]):
    """Batches of indices, each index included independently with probability `sample_rate`.

    Args:
        dataset_size: N > 0.
        sample_rate: q in (0, 1].
        steps / epochs: the number of batches (exactly one; steps = ceil(epochs / q)).
        generator: source of the sampling randomness, never derived from the data and unknown to
            an adversary (default: seeded from the OS entropy source; a publicly seeded generator
            reveals which examples were drawn and voids the amplification by subsampling).

    Under torch.distributed with W ranks (build it on every rank, after init_process_group), every
    rank draws the same batch, from rank 0's generator state (broadcast here, into `generator`),
    and yields only its share: chunk `rank` of the draw cut in order into W near-equal chunks
    (split_evenly). The shares are disjoint and together are the draw; a share may be empty.
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
        self.ranks, self.rank = distributed.world()
        distributed.broadcast_generator(self.generator)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.dataset_size

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            distributed.check_same_world(self.ranks, "this PoissonBatchSampler")
            draw = poisson_indices(self.dataset_size, self.sample_rate, self.generator)
            yield split_evenly(draw, self.ranks)[self.rank]


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
    return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=_EmptySafeCollate(loader),
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


class EmptyBatch:
    """An empty Poisson batch: length 0, `micro_batches` yields nothing from it, and any attempt to
    use it as data fails loudly. The step must still happen (`optimizer.step()` adds the noise)."""

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "EmptyBatch()"


class _EmptySafeCollate:
    def __init__(self, loader: DataLoader):
        self.collate_fn = loader.collate_fn

    def __call__(self, examples: list):
        return self.collate_fn(examples) if examples else EmptyBatch()


def _is_field_container(batch) -> bool:
    """A list/tuple of fields (tensors or nested structures, as default_collate returns), as opposed to a
    list of examples (strings, numpy arrays, numbers: what an identity collate_fn returns)."""
    return isinstance(batch, (list, tuple)) and len(batch) > 0 and all(
        torch.is_tensor(v) or isinstance(v, (Mapping, list, tuple)) for v in batch)


def batch_size_of(batch) -> int:
    """Number of examples in a (possibly nested) batch: the leading size of its first tensor or numpy
    array (or the length of a list of examples, e.g. raw strings)."""
    if isinstance(batch, EmptyBatch):
        return 0
    if torch.is_tensor(batch) or isinstance(batch, np.ndarray):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return batch_size_of(next(iter(batch.values())))
    if _is_field_container(batch) or (isinstance(batch, tuple) and hasattr(batch, "_fields")):
        return batch_size_of(batch[0])
    if isinstance(batch, (list, tuple)):
        return len(batch)
    raise TypeError(f"cannot find the batch dimension of a {type(batch).__name__}")


def like(mapping: Mapping, items: dict) -> Mapping:
    """A mapping of `mapping`'s type holding `items` (dict, BatchEncoding, ...; types whose constructor
    takes other arguments, such as defaultdict, are copied and updated)."""
    try:
        return type(mapping)(items)
    except TypeError:
        result = copy.copy(mapping)
        result.clear()
        result.update(items)
        return result


def replace_examples(batch, index: torch.Tensor, b: int):
    """`batch` with its examples taken in the order `index`: every tensor or numpy array whose
    dimension 0 is b is indexed, and so is a list (or tuple) of b examples; other fields (shared
    inputs, scalars, settings) are kept. A list whose items all have b rows is a list of fields
    (what default_collate returns), not of examples, unless its items are dicts (records).

    Raises:
        ValueError: nothing in the batch has b rows, so no example could be replaced.
    """
    replaced = 0

    def take(field):
        nonlocal replaced
        if isinstance(field, (list, tuple)):
            replaced += 1
            return type(field)(field[i] for i in index.tolist())
        if (torch.is_tensor(field) or isinstance(field, np.ndarray)) and field.ndim > 0 and field.shape[0] == b:
            replaced += 1
            return field[index.to(field.device)] if torch.is_tensor(field) else field[index.numpy()]
        return field

    def holds_examples(items) -> bool:
        records = all(isinstance(item, Mapping) for item in items)  # a list of dicts is one dict per example
        return len(items) == b and (records or not all(_has_rows(item, b) for item in items))

    result = _rebuild(batch, take, holds_examples)
    if not replaced:
        raise ValueError(f"cannot find the {b} examples in this {type(batch).__name__} batch: no tensor, array or list "
                         f"in it has {b} rows. Pass the batch as the loss function takes it, with the examples on "
                         "dimension 0.")
    return result


def _has_rows(value, b: int) -> bool:
    """Whether `value` is a field of a batch of b: a tensor / array with b rows, or a list of such."""
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        return value.ndim > 0 and value.shape[0] == b
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(_has_rows(item, b) for item in value)
    return False


def micro_batches(batch, max_size: int) -> Iterator:
    """Split a logical batch along its example axis into pieces of at most `max_size` examples.

    Tensors and numpy arrays are cut on dim 0, lists of examples (e.g. strings) by position; mappings
    (dict, Hugging Face BatchEncoding), tuples, lists and namedtuples of fields are cut field by field.
    A list of tensors is a list of fields (default_collate's convention), so per-example tensors must be
    stacked or padded into one tensor first. An `EmptyBatch` yields nothing. Fields whose size disagrees
    with the batch raise.
    """
    if not isinstance(max_size, int) or max_size <= 0:
        raise ValueError(f"max_size must be an integer > 0, got {max_size!r}")
    size = batch_size_of(batch)

    def cut(field, index: slice):
        if not (torch.is_tensor(field) or isinstance(field, (np.ndarray, list, tuple))):
            raise TypeError(f"micro_batches cannot split a {type(field).__name__} field")
        if len(field) != size:
            raise ValueError(f"a batch field has {len(field)} entries but the batch has {size} examples; "
                             "micro_batches needs every field on the example axis")
        return field[index]

    for start in range(0, size, max_size):
        index = slice(start, min(start + max_size, size))
        yield _rebuild(batch, lambda field: cut(field, index), lambda items: not _is_field_container(items))


def _rebuild(value, leaf: Callable, holds_examples: Callable[[list | tuple], bool]):
    """`value` with `leaf` applied to each field: each tensor, numpy array, list (or tuple) for which
    `holds_examples` is true, and anything else that is not a container. Mappings (rebuilt with their
    own type), namedtuples and the other lists and tuples are walked into."""
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        return leaf(value)
    if isinstance(value, Mapping):
        return like(value, {key: _rebuild(item, leaf, holds_examples) for key, item in value.items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_rebuild(item, leaf, holds_examples) for item in value))
    if isinstance(value, (list, tuple)) and not holds_examples(value):
        return type(value)(_rebuild(item, leaf, holds_examples) for item in value)
    return leaf(value)


class NonPoissonSampling(RuntimeError):
    """The logical batches do not look Poisson-sampled, so the reported epsilon would be wrong."""


class SamplingCheck:
    """Refuses to account for batches that are visibly not Poisson-sampled at the declared rate.

    Poisson batch sizes are Binomial(N, q): mean b = q N, variance v = b (1 - q). Over the last
    WINDOW logical batches (checked when v >= 1) two tests, each with a false-alarm probability
    below about 1e-9 per window, flag
    - fixed-size batches (e.g. DataLoader(batch_size=..., shuffle=True), short last batches
      included): one size repeats more often than a Binomial's largest probability
      (about 1/sqrt(2 pi v)) allows;
    - a different rate: the mean size is more than 6 standard errors from b.
    With allow_non_poisson=True the check is off and a warning says the epsilon is not a guarantee.
    """

    WINDOW = 40
    ALARM = 1e-9

    def __init__(self, plan, allow_non_poisson: bool):
        self.active = plan.sample_rate is not None and not allow_non_poisson
        rate = plan.sample_rate or 0.0
        self.expected = plan.expected_batch_size
        self.variance = plan.expected_batch_size * (1 - rate)
        self.sizes: list[int] = []
        if allow_non_poisson and plan.sample_rate is not None:
            warnings.warn("allow_non_poisson=True: the reported epsilon assumes Poisson sampling with rate "
                          f"{plan.sample_rate}; for any other sampler it is NOT a valid privacy guarantee.",
                          UserWarning, stacklevel=4)

    def observe(self, batch_size: int) -> None:
        if not self.active or self.variance < 1:
            return
        self.sizes = (self.sizes + [int(batch_size)])[-self.WINDOW:]
        if len(self.sizes) < self.WINDOW:
            return
        repeats = max(self.sizes.count(size) for size in set(self.sizes))
        mean = sum(self.sizes) / self.WINDOW
        if _binomial_tail(self.WINDOW, min(1.0, 1 / math.sqrt(2 * math.pi * self.variance)), repeats) < self.ALARM:
            problem = f"{repeats} of the last {self.WINDOW} logical batches had the same size"
        elif abs(mean - self.expected) > 6 * math.sqrt(self.variance / self.WINDOW):
            problem = (f"the last {self.WINDOW} logical batches averaged {mean:.1f} examples, not the expected "
                       f"{self.expected:.1f}")
        else:
            return
        raise NonPoissonSampling(
            f"{problem}; Poisson sampling at the declared rate would not produce that. The epsilon would be "
            "wrong: draw batches with prism.PoissonBatchSampler / prism.poisson_data_loader at the optimizer's "
            "rate (or pass allow_non_poisson=True to accept an epsilon that is not a guarantee).")

    def state_dict(self) -> dict:
        return {"sizes": list(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        self.sizes = list(state["sizes"])


def _binomial_tail(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) >= k)."""
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))
