"""Stage 4, reduce: the clipped sums of every rank added up (data parallel under torch.distributed).

After the clip stage each rank holds the clipped sums of its own share of the Poisson batch. The
reduce stage replaces them, and the step's counters, by their sums over all ranks, so the noise,
precondition and retract stages see the whole batch; every rank then takes the identical step.
Before that it checks that the replicas (trainable parameters and noise generator) are still
bit-identical. With one process it does nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..distributed import Replicas, check_same_world
from .units import StepStats, Unit


def sum_over_ranks(units: Sequence[Unit], stats: StepStats, ranks: int, replicas: Replicas | None,
                   params: Sequence[Tensor], generator: torch.Generator) -> None:
    """Replace every unit's clipped sums (zeros where this rank saw no example) and the step's
    counts by their sums over ranks, in place; a no-op with one process.

    Raises:
        RuntimeError: the number of ranks changed since the optimizer was built (`ranks`), or
            the replicas differ between ranks.
    """
    check_same_world(ranks, "this optimizer")
    if replicas is None:
        return
    replicas.check_identical(params, generator)
    for unit in units:
        unit.sums = unit.sums_or_zeros()
    counts = torch.tensor([stats.examples, stats.clipped, stats.nonfinite, stats.backward_passes, stats.forwarded])
    replicas.sum_over_ranks([t for unit in units for t in unit.sums] + [counts])
    stats.examples, clipped, nonfinite, stats.backward_passes, stats.forwarded = counts.tolist()
    stats.set_flag_counts(clipped, nonfinite)
