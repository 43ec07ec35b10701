"""Stage 4, reduce: the clipped sums of every rank added up (data parallel under torch.distributed).

After the clip stage each rank holds the clipped sums of its own share of the Poisson batch. The
reduce stage replaces them, and the step's counters, by their sums over all ranks, so the noise,
precondition and retract stages see the whole batch; every rank then takes the identical step.
Before that it checks that the replicas (trainable parameters and noise generator) are still
bit-identical, and that sharded parameters still hold their part of the whole value the optimizer
keeps. With one process it only does the latter.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..distributed import Replicas, check_same_world
from .units import StepStats, Unit

STALE_SHARDS = ("a sharded trained parameter was changed outside the optimizer (its local part no longer matches "
                "the whole value the optimizer keeps), e.g. by loading weights into the sharded model after the "
                "optimizer was built; load weights before building it, or load the optimizer's checkpoint with "
                "optimizer.load_state_dict on every rank afterwards.")


def sum_over_ranks(units: Sequence[Unit], stats: StepStats, ranks: int, replicas: Replicas | None,
                   values: Sequence[Tensor], stale_shards: int, generator: torch.Generator) -> None:
    """Replace every unit's clipped sums (zeros where this rank saw no example) and the step's
    counts by their sums over ranks, in place; a no-op with one process.

    `values` are the trained tensors as wholes (the whole values the optimizer keeps of sharded
    ones), `stale_shards` the number of sharded parameters whose local tensor is no longer their
    part of that whole value.

    Raises:
        RuntimeError: the number of ranks changed since the optimizer was built (`ranks`), the
            replicas differ between ranks, or a sharded parameter was written outside the optimizer.
    """
    check_same_world(ranks, "this optimizer")
    if replicas is None:
        if stale_shards:
            raise RuntimeError(STALE_SHARDS)
        return
    replicas.check_identical(values, generator, stale_shards, STALE_SHARDS)
    for unit in units:
        unit.sums = unit.sums_or_zeros()
    counts = torch.tensor([stats.examples, stats.clipped, stats.nonfinite, stats.backward_passes, stats.forwarded])
    replicas.sum_over_ranks([t for unit in units for t in unit.sums] + [counts])
    stats.examples, clipped, nonfinite, stats.backward_passes, stats.forwarded = counts.tolist()
    stats.set_flag_counts(clipped, nonfinite)
