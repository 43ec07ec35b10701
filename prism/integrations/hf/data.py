"""The Trainer's training data: Poisson draws cut into its micro-batches (prism's one sampler),
collated with the Trainer's collator, an empty micro-batch made into a marker no model reads."""

from __future__ import annotations

import functools

import torch
from torch.utils.data import DataLoader

from ...plan import PrivacyPlan
from ...sampling import EmptySafeCollate, PoissonBatchSampler

EMPTY_MICRO_BATCH = "prism_empty_micro_batch"  # the marker field of an empty micro-batch
EXAMPLE_COUNT = "prism_examples"  # the number of examples a micro-batch was collated from


def poisson_train_dataloader(trainer, sampler: PoissonBatchSampler, plan: PrivacyPlan) -> DataLoader:
    """The Trainer's training DataLoader with Poisson micro-batches (installed by make_private)."""
    check_unchanged_since_make_private(trainer, sampler, plan)
    dataset, collate = trainer.train_dataset, trainer.data_collator
    # the Trainer's own handling of columns the model does not accept (private helpers of Trainer)
    if hasattr(dataset, "column_names") and hasattr(trainer, "_remove_unused_columns"):
        dataset = trainer._remove_unused_columns(dataset, description="training")
    elif hasattr(trainer, "_get_collator_with_removed_columns"):
        collate = trainer._get_collator_with_removed_columns(collate, description="training")
    main_input = getattr(trainer.model, "main_input_name", "input_ids")
    args = trainer.args
    workers = dict(num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                   persistent_workers=getattr(args, "dataloader_persistent_workers", False),
                   prefetch_factor=getattr(args, "dataloader_prefetch_factor", None),
                   multiprocessing_context=getattr(args, "dataloader_multiprocessing_context", None))
    collate = EmptySafeCollate(collate, empty=functools.partial(empty_micro_batch, main_input),
                               count_key=EXAMPLE_COUNT)  # the count is checked against the rows the loss sees
    # `dataloader_in_order` is not passed: out-of-order workers could mix micro-batches of two Poisson draws
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **workers)


def empty_micro_batch(main_input_name: str) -> dict:
    """What an empty micro-batch becomes: the marker the loss recognises (losses.py), plus the
    two fields the Trainer reads (to count tokens and labels) before the loss sees the marker."""
    return {EMPTY_MICRO_BATCH: torch.ones(()), main_input_name: torch.zeros(0, dtype=torch.long),
            "labels": torch.zeros(0, dtype=torch.long)}


def check_unchanged_since_make_private(trainer, sampler: PoissonBatchSampler, plan: PrivacyPlan) -> None:
    """The sampler was sized at make_private: N examples, each draw cut into k micro-batches, one
    private step per draw. Another k would merge draws into one step (or split one over two);
    another dataset would sample the wrong N."""
    accumulation = trainer.args.gradient_accumulation_steps
    if accumulation != sampler.micro_batches:
        raise ValueError(f"gradient_accumulation_steps is {accumulation} but was {sampler.micro_batches} when "
                         "make_private built the Poisson sampler: each private step would no longer be one draw. "
                         "Set it before calling make_private.")
    plan.check_dataset_size(len(trainer.train_dataset), what="train_dataset")
