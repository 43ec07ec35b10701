"""Poisson sampling (the sampling the accountant assumes) and micro-batching of logical batches.

Each step includes every example independently with probability q, so logical batches have a
random size (Binomial(N, q), possibly 0). An empty batch must still be followed by
`optimizer.step()`: skipping it would reveal that no example was drawn.

    loader = prism.poisson_data_loader(DataLoader(dataset, collate_fn=collate), sample_rate=q, steps=T)
    for batch in loader:                                   # one logical batch per step
        for micro in prism.micro_batches(batch, max_size=16):
            loss_sum(model, micro).backward()
        optimizer.step()                                   # also for an empty batch

- poisson.py: the one sampler (plain loop and Trainer), its DataLoader, the draw and the cut.
- batches.py: what a batch is: EmptyBatch, the empty-safe collate, micro_batches, replace_examples.
- check.py: the guard that refuses to account for batches that are visibly not Poisson draws.
"""

from .batches import EmptyBatch, EmptySafeCollate, batch_size_of, like, micro_batches, replace_examples
from .check import NonPoissonSampling, SamplingCheck
from .poisson import PoissonBatchSampler, poisson_data_loader, poisson_indices, split_evenly, worker_settings

__all__ = ["PoissonBatchSampler", "poisson_data_loader", "poisson_indices", "split_evenly", "worker_settings",
           "EmptyBatch", "EmptySafeCollate", "batch_size_of", "like", "micro_batches", "replace_examples",
           "NonPoissonSampling", "SamplingCheck"]
