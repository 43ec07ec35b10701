"""Hugging Face Trainer integration: an existing Trainer loop becomes private with one call.

    opt = prism.PRISM(model, lr=5e-3, max_grad_norm=1.0, target_epsilon=3.0, delta=1e-5,
                      expected_batch_size=256, dataset_size=len(train_set), steps=60)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                      optimizers=(opt, None))
    prism.hf.make_private(trainer)
    trainer.train()

No Trainer subclass and no model wrapper: `make_private` sets two of the Trainer's documented
override points on this one instance (`get_train_dataloader`, `compute_loss`) and adds a callback.

- Sampling (data.py): each logical step draws a Poisson batch (every example independently with
  the optimizer's rate q = expected_batch_size / N) and splits it into `gradient_accumulation_steps`
  micro-batches (prism.sampling.PoissonBatchSampler); the optimizer steps once per logical batch.
  A micro-batch left empty by the draw runs no forward pass (its loss is a constant 0), and the
  step still adds its noise.
- Loss (losses.py): each example's loss depends on that example alone (seq. classification, token
  classification and causal LM built in; padding and label -100 excluded). The Trainer's
  token-mean over the whole batch, `num_items_in_batch` and its division by the accumulation
  steps are neutralised: the per-example losses are summed (or averaged, per the optimizer's
  `loss_reduction`) and any factor the Trainer applies afterwards is divided out
  (`optimizer.watch_loss`).
- Rows are examples: the first training micro-batch of >= 2 examples is probed once
  (`optimizer.check_examples`, prism.probe) before its step; `check_examples=False` skips it.
- Settings (checks.py): Trainer's own `max_grad_norm` clipping is switched off (prism clips per
  example); arguments that would leak, couple examples or break the one-draw-per-step rule are
  refused.
- Logs (callbacks.py): `epsilon` (the accountant's upper bound at the optimizer's delta) at every
  logging step and in the final metrics; the `grad_norm` entry and other counts of the private
  batches are dropped. The logged training loss is NOT private (it is computed from the private
  batch without noise); do not publish it.
- Budget (callbacks.py): with the optimizer's `max_epsilon`, training stops before a step that
  would exceed it. With `target_epsilon` and `steps`, the Trainer runs exactly those steps.
- TRL (sft.py): `trl.SFTTrainer` is made private by the same call. Its loss becomes each example's
  mean token loss over its own labelled tokens (completion-only and assistant-only labels as its
  dataset preparation built them), through its fused LM head; packing and padding-free rows are
  refused (a row is not an example), and other TRL trainers (DPO, GRPO, reward, ...) by name.
- Export (export.py): with a PiSSA-style init (part of W0 moved into the adapter) the initial
  adapter is kept in output_dir/prism_initial_adapter and `save_adapter_for_base(trainer, dir)`
  writes an adapter for the original base model (prism.export).
- Checkpoints: the optimizer's state (accountant, noise generator, steps) is saved in the
  Trainer's optimizer.pt; `resume_from_checkpoint` continues epsilon and, with a seeded sampler,
  the exact batch sequence (Poisson draws are keyed by the step index, so no data is skipped).
- Distributed (`torchrun --nproc_per_node W`, one process per device): build the optimizer after
  TrainingArguments (which starts torch.distributed) with the GLOBAL expected batch size. Every
  rank draws the same Poisson batch (rank 0's seed or generator state) and trains on its share,
  split into its micro-batches; the optimizer sums the clipped sums over ranks and adds the same
  noise on every rank (prism.distributed). The model is not wrapped in DistributedDataParallel
  (accelerate only applies autocast to it). DeepSpeed, FSDP and DataParallel are refused.
"""

from __future__ import annotations

import functools

from ...sampling import PoissonBatchSampler
from . import checks
from .callbacks import UNNOISED_LOG_KEYS, PrivacyCallback
from .data import poisson_train_dataloader
from .export import keep_initial_adapter, save_adapter_for_base
from .losses import (FirstBatchProbe, PerExampleLoss, compute_loss, default_per_example_loss,
                     per_example_compute_loss, per_example_losses)
from .sft import check_sft_trainer, is_supported_trl_trainer, sft_loss_path, sft_per_example_loss

__all__ = ["make_private", "save_adapter_for_base", "default_per_example_loss", "per_example_compute_loss",
           "sft_per_example_loss", "PrivacyCallback", "PerExampleLoss", "UNNOISED_LOG_KEYS"]


def make_private(trainer, *, per_example_loss: PerExampleLoss | None = None,
                 sampling_seed: int | None = None, check_examples: bool = True) -> PrivacyCallback:
    """Make `trainer` train privately with the prism optimizer it was given.

    Args:
        trainer: a `transformers.Trainer` or `trl.SFTTrainer` built with
            `optimizers=(prism_optimizer, scheduler_or_None)`.
        per_example_loss: `(model outputs, labels) -> (b,)` losses; default: chosen from the
            model's task (sequence classification, token classification, causal LM); for an
            SFTTrainer, each example's mean token loss over its labelled tokens (sft.py).
        sampling_seed: seed of the Poisson draws, for reproducible runs only. Default: OS entropy.
            A seed known to an adversary reveals which examples each step used and voids the
            privacy amplification by subsampling.
        check_examples: probe the first training micro-batch of >= 2 examples once
            (`optimizer.check_examples`): raise if a trained module's rows are not the examples
            or the model mixes examples. Costs five forward and up to four backward passes, once.

    Returns:
        The callback added to the trainer (its `optimizer` and `sampler` attributes).
    """
    is_sft = is_supported_trl_trainer(trainer)  # other TRL trainers are refused by name
    if any(isinstance(c, PrivacyCallback) for c in trainer.callback_handler.callbacks):
        raise ValueError("make_private was already called on this trainer.")
    optimizer = checks.prism_optimizer(trainer)
    if is_sft:
        check_sft_trainer(trainer, optimizer, per_example_loss)
    checks.check_model(trainer.model, optimizer)
    dataset_size = checks.check_dataset(trainer, optimizer)
    trainer.args = checks.adjusted_arguments(trainer.args, optimizer)
    if trainer.args.world_size > 1:
        # Accelerate would wrap the model in DistributedDataParallel, whose gradient all-reduce
        # hangs when ranks run different numbers of micro-batches; prism reduces the clipped sums
        # itself. Preparing it now for evaluation only (autocast, compile) makes the Trainer's
        # own prepare() leave it unwrapped.
        trainer.accelerator.prepare_model(trainer.model, evaluation_mode=True)
    forward, evaluation_loss = (sft_loss_path if is_sft else _trainer_loss_path)(trainer, per_example_loss)
    # one "epoch" of the Trainer is ceil(1/q) draws, N examples in expectation
    sampler = PoissonBatchSampler(dataset_size, optimizer.plan.sample_rate, epochs=1, seed=sampling_seed,
                                  micro_batches=trainer.args.gradient_accumulation_steps)
    trainer.get_train_dataloader = functools.partial(poisson_train_dataloader, trainer, sampler, optimizer.plan)
    probe = FirstBatchProbe(optimizer, forward) if check_examples else None
    trainer.compute_loss = functools.partial(compute_loss, optimizer, forward, evaluation_loss, probe)
    # the Trainer then divides each micro-batch's loss by the accumulation steps (watch_loss undoes
    # it for the gradients), so the logged loss is the mean per-example loss
    trainer.loss_is_scaled_for_ga = False
    trainer.floating_point_ops = lambda inputs: 0  # FLOP counts would reveal each Poisson batch's size
    callback = PrivacyCallback(optimizer, sampler, probe)
    keep_initial_adapter(trainer, callback)
    trainer.callback_handler.callbacks.insert(0, callback)  # first, so reporters see the epsilon it adds
    return callback


def _trainer_loss_path(trainer, per_example_loss: PerExampleLoss | None):
    """(the training forward giving (b,) losses, the evaluation loss or None) of a transformers.Trainer."""
    checks.check_loss_path(trainer, per_example_loss)
    loss_fn = per_example_loss or default_per_example_loss(trainer.model, trainer.args.label_smoothing_factor)
    evaluation_loss = trainer.compute_loss if per_example_loss is None else None  # the Trainer's own
    return functools.partial(per_example_losses, loss_fn), evaluation_loss
