"""Hugging Face Trainer integration: an existing Trainer loop becomes private with one call.

    opt = prism.PRISM(model, lr=5e-3, max_grad_norm=1.0, target_epsilon=3.0, delta=1e-5,
                      expected_batch_size=256, dataset_size=len(train_set), steps=60)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                      optimizers=(opt, None))
    prism.hf.make_private(trainer)
    trainer.train()

No Trainer subclass and no model wrapper: `make_private` sets two of the Trainer's documented
override points on this one instance (`get_train_dataloader`, `compute_loss`) and adds a callback.

- Sampling: each logical step draws a Poisson batch (every example independently with the
  optimizer's rate q = expected_batch_size / N) and splits it into `gradient_accumulation_steps`
  micro-batches; the optimizer steps once per logical batch. A micro-batch left empty by the draw
  runs no forward pass (its loss is a constant 0), and the step still adds its noise.
- Loss: each example's loss depends on that example alone (seq. classification, token
  classification and causal LM built in; padding and label -100 excluded). The Trainer's
  token-mean over the whole batch, `num_items_in_batch` and its division by the accumulation
  steps are neutralised: the per-example losses are summed (or averaged, per the optimizer's
  `loss_reduction`) and any factor the Trainer applies afterwards is divided out
  (`optimizer.watch_loss`).
- Rows are examples: the first training micro-batch of >= 2 examples is probed once
  (`optimizer.check_examples`, prism.probe) before its step; `check_examples=False` skips it.
- Trainer's own `max_grad_norm` clipping is switched off (prism clips per example) and its
  `grad_norm` log entry dropped: the non-private gradient is never kept or logged.
- Logs: `epsilon` (the accountant's upper bound at the optimizer's delta) at every logging step
  and in the final metrics. The logged training loss is NOT private (it is computed from the
  private batch without noise); do not publish it.
- Budget: with the optimizer's `max_epsilon`, training stops before a step that would exceed it.
  With `target_epsilon` and `steps`, the Trainer runs exactly those steps (more is refused).
- Export: with a PiSSA-style init (part of W0 moved into the adapter) the initial adapter is
  kept in output_dir/prism_initial_adapter and `save_adapter_for_base(trainer, dir)` writes an
  adapter for the original base model (prism.export).
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

import copy
import functools
import logging
import math
import os
import warnings
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer, TrainerCallback
from transformers.models.auto import modeling_auto

from . import distributed, export
from .optim.base import DPLoRAOptimizer
from .accounting import PrivacyBudgetExceeded, steps_in_epochs
from .losses import (drop_labels_after_padding, per_example_causal_lm_loss, per_example_sequence_loss,
                     per_example_token_loss)
from .pipeline.noise import entropy_seeded_generator
from .sampling import poisson_indices, split_evenly

logger = logging.getLogger(__name__)

EMPTY_MICRO_BATCH = "prism_empty_micro_batch"
INITIAL_ADAPTER = "prism_initial_adapter"
EXAMPLE_COUNT = "prism_examples"
# Trainer log entries computed from the private batches without noise (batch sizes, token counts)
UNNOISED_LOG_KEYS = ("grad_norm", "total_flos", "num_input_tokens_seen", "train_tokens_per_second")

PerExampleLoss = Callable[[object, Tensor], Tensor]


def make_private(trainer, *, per_example_loss: PerExampleLoss | None = None,
                 sampling_seed: int | None = None, check_examples: bool = True) -> "PrivacyCallback":
    """Make `trainer` train privately with the prism optimizer it was given.

    Args:
        trainer: a `transformers.Trainer` built with `optimizers=(prism_optimizer, scheduler_or_None)`.
        per_example_loss: `(model outputs, labels) -> (b,)` losses; default: chosen from the
            model's task (sequence classification, token classification, causal LM).
        sampling_seed: seed of the Poisson draws, for reproducible runs only. Default: OS entropy.
            A seed known to an adversary reveals which examples each step used and voids the
            privacy amplification by subsampling.
        check_examples: probe the first training micro-batch of >= 2 examples once
            (`optimizer.check_examples`): raise if a trained module's rows are not the examples
            or the model mixes examples. Costs five forward and up to four backward passes, once.

    Returns:
        The callback added to the trainer (its `optimizer` and `sampler` attributes).
    """
    if any(isinstance(c, PrivacyCallback) for c in trainer.callback_handler.callbacks):
        raise ValueError("make_private was already called on this trainer.")
    optimizer = _prism_optimizer(trainer)
    _check_model(trainer.model, optimizer)
    dataset_size = _check_dataset(trainer, optimizer)
    trainer.args = copy.copy(trainer.args)  # adjusted for this run only: callers reuse their arguments across runs
    _adjust_arguments(trainer.args, optimizer)
    if trainer.args.world_size > 1:
        # Accelerate would wrap the model in DistributedDataParallel, whose gradient all-reduce
        # hangs when ranks run different numbers of micro-batches; prism reduces the clipped sums
        # itself. Preparing it now for evaluation only (autocast, compile) makes the Trainer's
        # own prepare() leave it unwrapped.
        trainer.accelerator.prepare_model(trainer.model, evaluation_mode=True)
    _check_loss_path(trainer, per_example_loss)
    loss_fn = per_example_loss or default_per_example_loss(trainer.model, trainer.args.label_smoothing_factor)
    sampler = PoissonMicroBatchSampler(dataset_size, optimizer.plan.sample_rate,
                                       trainer.args.gradient_accumulation_steps, seed=sampling_seed)
    trainer.get_train_dataloader = functools.partial(poisson_train_dataloader, trainer, sampler)
    evaluation_loss = trainer.compute_loss if per_example_loss is None else None  # the Trainer's own
    probe = _FirstBatchProbe(optimizer, loss_fn) if check_examples else None
    trainer.compute_loss = functools.partial(_compute_loss, optimizer, loss_fn, evaluation_loss, probe)
    # the Trainer then divides each micro-batch's loss by the accumulation steps (watch_loss undoes
    # it for the gradients), so the logged loss is the mean per-example loss
    trainer.loss_is_scaled_for_ga = False
    trainer.floating_point_ops = lambda inputs: 0  # FLOP counts would reveal each Poisson batch's size
    callback = PrivacyCallback(optimizer, sampler, probe)
    if export.mutates_base(trainer.model):
        callback.initial_adapter_dir = os.path.join(trainer.args.output_dir, INITIAL_ADAPTER)
        if trainer.args.should_save:  # one writer per output directory
            export.keep_initial_adapter(trainer.model, callback.initial_adapter_dir)
    trainer.callback_handler.callbacks.insert(0, callback)  # first, so reporters see the epsilon it adds
    return callback


def save_adapter_for_base(trainer, save_directory: str) -> None:
    """Save the trained adapter for the ORIGINAL base model (see prism.export); with a PiSSA-style
    init it uses the initial adapter make_private kept in output_dir/prism_initial_adapter."""
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, PrivacyCallback)), None)
    if callback is None:
        raise ValueError("this trainer was not made private with prism.hf.make_private.")
    export.save_adapter_for_base(trainer.model, save_directory, callback.initial_adapter_dir)


def _check_loss_path(trainer, per_example_loss: PerExampleLoss | None) -> None:
    """Refuse a training_step prism cannot see through, and a custom loss that has no per-example version."""
    if type(trainer).training_step is not Trainer.training_step:
        raise ValueError(f"{type(trainer).__name__} overrides training_step; prism cannot check that each example's "
                         "gradient comes from its own loss. Use transformers.Trainer (or a subclass that keeps it).")
    custom = type(trainer).compute_loss is not Trainer.compute_loss or trainer.compute_loss_func is not None
    if custom and per_example_loss is None:
        raise ValueError(f"{type(trainer).__name__} has its own compute_loss or compute_loss_func, which prism must "
                         "replace by a loss computed per example. Pass per_example_loss=... to make_private: your "
                         "loss as a function (outputs, labels) -> one loss per example (see prism.losses), or "
                         "prism.hf.default_per_example_loss(model) if the default loss is what you want.")
    if per_example_loss is not None and trainer.args.label_smoothing_factor:
        warnings.warn("label_smoothing_factor is not applied to a custom per_example_loss; apply it there.",
                      UserWarning, stacklevel=3)


def _prism_optimizer(trainer) -> DPLoRAOptimizer:
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate may have wrapped it
    if not isinstance(optimizer, DPLoRAOptimizer):
        raise TypeError("make_private needs a prism optimizer: build the Trainer with "
                        "optimizers=(prism.PRISM(model, ...), None); got "
                        f"{type(optimizer).__name__ if optimizer is not None else 'no optimizer'}.")
    if optimizer.accountant is None or optimizer.plan.delta is None:
        raise ValueError("the optimizer cannot account: build it with dataset_size=len(train_dataset) (or "
                         "sample_rate) and delta, so the Trainer can report epsilon.")
    return optimizer


def _check_model(model: nn.Module, optimizer: DPLoRAOptimizer) -> None:
    modules = {id(m) for m in model.modules()}
    hooked = [pair.lora_A for pair in optimizer.pairs] + [d.module for d in optimizer.dense]
    if not all(id(m) in modules for m in hooked):
        raise ValueError("the optimizer was built on a different model than the Trainer's; build it with "
                         "prism.PRISM(trainer_model, ...).")


def _check_dataset(trainer, optimizer: DPLoRAOptimizer) -> int:
    dataset = trainer.train_dataset
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError("Poisson sampling needs a train_dataset with a length and random access (a map-style "
                         "dataset); streaming / IterableDataset cannot be sampled privately.")
    size = len(dataset)
    implied = optimizer.expected_batch_size / optimizer.plan.sample_rate
    if not math.isclose(implied, size, rel_tol=1e-9):
        raise ValueError(f"the optimizer was built for a dataset of {implied:.0f} examples but train_dataset has "
                         f"{size}; build it with dataset_size=len(train_dataset).")
    return size


def _adjust_arguments(args, optimizer: DPLoRAOptimizer) -> None:
    if args.n_gpu > 1:
        raise NotImplementedError("DataParallel (several GPUs in one process) is not supported; launch one process "
                                  "per GPU with torchrun (prism sums the clipped gradients over processes).")
    if args.world_size > 1 and (args.deepspeed or args.fsdp):
        raise NotImplementedError("DeepSpeed and FSDP shard what prism keeps replicated; use plain data parallel "
                                  "(torchrun without --deepspeed / --fsdp).")
    refused = {
        "include_num_input_tokens_seen": (args.include_num_input_tokens_seen not in (False, None, "no"),
                                          "it logs the token count of each private batch without noise"),
        "neftune_noise_alpha": (args.neftune_noise_alpha is not None,
                                "its noise scale depends on the longest sequence of the micro-batch, coupling examples"),
        "auto_find_batch_size": (bool(args.auto_find_batch_size),
                                 "its retries would rerun part of a private step; set gradient_accumulation_steps"),
        "hub_strategy": (bool(args.push_to_hub) and str(getattr(args.hub_strategy, "value", args.hub_strategy))
                         in ("checkpoint", "all_checkpoints") and not optimizer.secure_noise,
                         "it uploads checkpoints, whose optimizer.pt holds the noise generator state "
                         "(use generator='secure' or hub_strategy='end')"),
        "gradient_checkpointing_kwargs": (bool(args.gradient_checkpointing) and (args.gradient_checkpointing_kwargs
                                          or {}).get("use_reentrant") is True,
                                          "reentrant checkpointing clips each segment on its own; use "
                                          "{'use_reentrant': False}"),
    }
    for name, (bad, why) in refused.items():
        if bad:
            raise ValueError(f"TrainingArguments.{name} is not supported with prism: {why}.")
    if args.push_to_hub:
        warnings.warn("push_to_hub also publishes the training-loss table in the model card; the logged loss is "
                      "not private.", UserWarning, stacklevel=3)
    if args.fp16:
        raise ValueError("fp16 with a gradient scaler is not supported (the scaler needs the non-private "
                         "gradients prism drops); use bf16=True, or fp32.")
    if args.max_grad_norm and args.max_grad_norm > 0:
        warnings.warn(f"TrainingArguments.max_grad_norm={args.max_grad_norm} is ignored: prism clips each "
                      f"example's gradient to the optimizer's max_grad_norm={optimizer.max_grad_norm}. Set "
                      "max_grad_norm=0 to silence this warning.", UserWarning, stacklevel=3)
        args.max_grad_norm = 0.0
    micro_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if not 0.5 <= micro_batch / optimizer.expected_batch_size <= 2:
        warnings.warn(f"per_device_train_batch_size is ignored: each step draws a Poisson batch of about "
                      f"{optimizer.expected_batch_size:.0f} examples (the optimizer's expected_batch_size), split into "
                      f"{args.gradient_accumulation_steps} micro-batches per process; raise "
                      "gradient_accumulation_steps if they do not fit in memory.", UserWarning, stacklevel=3)
    # Poisson draws are keyed by the step index, so a resumed run must not replay and skip batches.
    args.ignore_data_skip = True
    planned = optimizer.plan.steps
    if planned is None:
        return
    if args.max_steps is None or args.max_steps <= 0:
        logger.info("prism: max_steps set to %d, the steps the optimizer was calibrated for", planned)
        args.max_steps = planned
    elif args.max_steps > planned:
        raise ValueError(f"TrainingArguments.max_steps={args.max_steps} exceeds the {planned} steps the optimizer's "
                         f"noise was calibrated for; set max_steps <= {planned} or rebuild the optimizer with "
                         f"steps={args.max_steps}.")


class PoissonMicroBatchSampler(Sampler[list[int]]):
    """Index lists for the Trainer: per logical step one Poisson draw, split into k micro-batches.

    The draw of logical step t includes each of the N indices independently with probability q;
    its indices are split in order into k chunks of near-equal size (chunks may be empty). One
    "epoch" is ceil(1/q) logical steps, N examples in expectation.

    Under torch.distributed with W ranks (build it on every rank): every rank draws the same batch
    (rank 0's seed, or rank 0's entropy-seeded generator state, broadcast here), keeps its share
    (chunk `rank` of the draw cut in order into W chunks) and splits that into the k micro-batches.

    Args:
        dataset_size: N.
        sample_rate: q.
        micro_batches: k, the Trainer's gradient_accumulation_steps.
        seed: None (default) draws from an OS-entropy-seeded generator. An integer keys each
            step's draw on (seed, t), so a resumed run draws exactly what an uninterrupted one would.
    """

    def __init__(self, dataset_size: int, sample_rate: float, micro_batches: int, *, seed: int | None = None):
        self.dataset_size = dataset_size
        self.sample_rate = sample_rate
        self.micro_batches = micro_batches
        self.ranks, self.rank = distributed.world()
        self.seed = distributed.broadcast_object(seed)
        self.steps_per_epoch = steps_in_epochs(1.0, sample_rate)
        self.next_step = 0
        self._entropy = distributed.broadcast_generator(entropy_seeded_generator()) if self.seed is None else None

    def __len__(self) -> int:
        return self.steps_per_epoch * self.micro_batches

    def __iter__(self):
        for _ in range(self.steps_per_epoch):
            distributed.check_same_world(self.ranks, "the Trainer's Poisson sampler")
            indices = poisson_indices(self.dataset_size, self.sample_rate, self._generator(self.next_step))
            self.next_step += 1
            yield from split_evenly(split_evenly(indices, self.ranks)[self.rank], self.micro_batches)

    def _generator(self, step: int) -> torch.Generator:
        if self.seed is None:
            return self._entropy
        key = np.random.SeedSequence([self.seed, step]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(key) >> 1)


class _MicroBatchCollate:
    """The Trainer's collator, except that an empty micro-batch becomes a marker read by no model."""

    def __init__(self, collate_fn: Callable, main_input_name: str):
        self.collate_fn = collate_fn
        self.main_input_name = main_input_name

    def __call__(self, examples: list):
        if examples:
            batch = self.collate_fn(examples)
            batch[EXAMPLE_COUNT] = torch.tensor(len(examples))  # checked against the rows compute_loss sees
            return batch
        # the Trainer reads these two fields (to count tokens and labels) before compute_loss sees the marker
        return {EMPTY_MICRO_BATCH: torch.ones(()), self.main_input_name: torch.zeros(0, dtype=torch.long),
                "labels": torch.zeros(0, dtype=torch.long)}


def poisson_train_dataloader(trainer, sampler: PoissonMicroBatchSampler) -> DataLoader:
    """The Trainer's training DataLoader with Poisson micro-batches (installed by make_private)."""
    _check_unchanged_since_make_private(trainer, sampler)
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
    # `dataloader_in_order` is not passed: out-of-order workers could mix micro-batches of two Poisson draws
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_MicroBatchCollate(collate, main_input), **workers)


def _check_unchanged_since_make_private(trainer, sampler: PoissonMicroBatchSampler) -> None:
    """The sampler was sized at make_private: N examples, each draw cut into k micro-batches, one
    private step per draw. Another k would merge draws into one step (or split one over two);
    another dataset would sample the wrong N."""
    accumulation = trainer.args.gradient_accumulation_steps
    if accumulation != sampler.micro_batches:
        raise ValueError(f"gradient_accumulation_steps is {accumulation} but was {sampler.micro_batches} when "
                         "make_private built the Poisson sampler: each private step would no longer be one draw. "
                         "Set it before calling make_private.")
    size = len(trainer.train_dataset)
    if size != sampler.dataset_size:
        raise ValueError(f"train_dataset has {size} examples but make_private sampled from "
                         f"{sampler.dataset_size}. Build a new optimizer (dataset_size=len(train_dataset)) and "
                         "trainer for the new dataset.")


class _FirstBatchProbe:
    """Runs optimizer.check_examples once, on the first training micro-batch of >= 2 examples."""

    def __init__(self, optimizer: DPLoRAOptimizer, loss_fn: PerExampleLoss):
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.done = False

    def __call__(self, model: nn.Module, inputs: dict) -> None:
        labels = inputs.get("labels")
        if self.done or EMPTY_MICRO_BATCH in inputs or labels is None or labels.shape[0] < 2:
            return
        self.optimizer.check_examples(inputs, lambda m, batch: _per_example_losses(self.loss_fn, m, batch)[0])
        self.done = True


def _compute_loss(optimizer: DPLoRAOptimizer, loss_fn: PerExampleLoss, evaluation_loss: Callable | None,
                  probe: _FirstBatchProbe | None, model: nn.Module, inputs: dict, return_outputs: bool = False,
                  num_items_in_batch=None):
    """Training: per_example_compute_loss (after the one-off probe). Evaluation (no gradient): the
    Trainer's own loss where the default per-example loss is in use, so eval_loss stays comparable
    with non-private runs; else the mean of the given per-example losses (independent of loss_reduction)."""
    if torch.is_grad_enabled():
        if probe is not None:
            probe(model, inputs)
        return per_example_compute_loss(optimizer, loss_fn, model, inputs, return_outputs)
    if evaluation_loss is not None:  # num_items_in_batch only where given: older Trainers do not take it
        extra = {} if num_items_in_batch is None else dict(num_items_in_batch=num_items_in_batch)
        return evaluation_loss(model, inputs, return_outputs=return_outputs, **extra)
    losses, outputs = _per_example_losses(loss_fn, model, inputs)
    return (losses.mean(), outputs) if return_outputs else losses.mean()


def per_example_compute_loss(optimizer: DPLoRAOptimizer, loss_fn: PerExampleLoss, model: nn.Module, inputs: dict,
                             return_outputs: bool = False, num_items_in_batch=None):
    """Trainer.compute_loss with per-example losses reduced as the optimizer's loss_reduction says.

    `num_items_in_batch` is ignored on purpose: a normaliser counted over the whole batch would
    couple the examples.
    """
    if EMPTY_MICRO_BATCH in inputs:
        loss = torch.zeros((), device=inputs[EMPTY_MICRO_BATCH].device, requires_grad=True)
        return (loss, None) if return_outputs else loss
    losses, outputs = _per_example_losses(loss_fn, model, inputs)
    loss = losses.sum() if optimizer.loss_reduction == "sum" else losses.mean()
    optimizer.watch_loss(loss)
    return (loss, outputs) if return_outputs else loss


def _per_example_losses(loss_fn: PerExampleLoss, model: nn.Module, inputs: dict) -> tuple[Tensor, object]:
    """((b,) losses, the model's outputs) of a batch whose labels the model does not see."""
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    examples = inputs.pop(EXAMPLE_COUNT, None)
    if labels is None:
        raise ValueError("prism needs the labels in every batch (a 'labels' field) to form per-example losses.")
    if examples is not None and labels.shape[0] != int(examples):
        raise ValueError(f"the collator turned {int(examples)} examples into {labels.shape[0]} rows (padding-free "
                         "packing such as DataCollatorWithFlattening?); prism clips per row, so it needs one row "
                         "per example. Use a padding collator (e.g. DataCollatorWithPadding).")
    outputs = model(**_with_decoder_inputs(model, inputs, labels))
    if getattr(loss_fn, "predicts_the_next_token", False) and torch.is_tensor(inputs.get("attention_mask")):
        labels = drop_labels_after_padding(labels, inputs["attention_mask"])  # left padding: see prism.losses
    losses = loss_fn(outputs, labels)
    batch = labels.shape[0]
    if losses.shape != (batch,):
        raise ValueError(f"the per-example loss must have shape ({batch},), one loss per example; got "
                         f"{tuple(losses.shape)}.")
    return losses, outputs


def _with_decoder_inputs(model: nn.Module, inputs: dict, labels: Tensor) -> dict:
    """An encoder-decoder model builds its decoder inputs from the labels, which the model no longer
    gets (its own loss is a batch mean): build them here, as the model would."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or {"decoder_input_ids", "decoder_inputs_embeds"} & set(inputs):
        return inputs
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise ValueError(f"{type(model).__name__} cannot build decoder_input_ids from the labels; put "
                         "decoder_input_ids in each batch.")
    return {**inputs, "decoder_input_ids": prepare(labels=labels)}


def default_per_example_loss(model: nn.Module, label_smoothing: float = 0.0) -> PerExampleLoss:
    """The per-example loss for the model's task, read from peft's task_type or the model class."""
    task = _task_of(model)
    if task == "CAUSAL_LM":
        def causal_lm_loss(outputs, labels):
            return per_example_causal_lm_loss(outputs.logits, labels, label_smoothing=label_smoothing)
        causal_lm_loss.predicts_the_next_token = True  # _per_example_losses drops labels predicted from padding
        return causal_lm_loss
    if task in ("TOKEN_CLS", "SEQ_2_SEQ_LM"):  # seq2seq: decoder logits t predict label t (no shift)
        return lambda outputs, labels: per_example_token_loss(outputs.logits, labels,
                                                              label_smoothing=label_smoothing)
    if task == "SEQ_CLS":
        problem_type = model.config.problem_type
        return lambda outputs, labels: per_example_sequence_loss(outputs.logits, labels, problem_type,
                                                                 label_smoothing)
    raise ValueError(f"prism cannot tell the task of {type(model).__name__}; pass make_private(trainer, "
                     "per_example_loss=fn) with fn(outputs, labels) -> (batch,) losses.")


def _task_of(model: nn.Module) -> str | None:
    configs, active = getattr(model, "peft_config", None), getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(configs, dict) and isinstance(active, str) else None
    task = getattr(config, "task_type", None)
    if task is not None:
        return str(getattr(task, "value", task))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for task, classes in (("CAUSAL_LM", modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("SEQ_CLS", modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
                          ("TOKEN_CLS", modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
                          ("SEQ_2_SEQ_LM", modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)):
        if type(base).__name__ in set(classes.values()):
            return task
    return None


class PrivacyCallback(TrainerCallback):
    """Keeps the Trainer and the privacy bookkeeping in step (added by make_private)."""

    def __init__(self, optimizer: DPLoRAOptimizer, sampler: PoissonMicroBatchSampler,
                 probe: _FirstBatchProbe | None = None):
        self.optimizer = optimizer
        self.sampler = sampler
        self.probe = probe
        self.initial_adapter_dir: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        restored = self.optimizer.restore_parameters()
        if restored:
            logger.info("prism: %d parameters replaced while loading the checkpoint were put back", restored)
        self._check_in_step(state, "at the start of training (after loading any checkpoint)")
        planned = self.optimizer.plan.steps
        if planned is not None and state.max_steps > planned:
            raise ValueError(f"the Trainer will run {state.max_steps} steps but the optimizer's noise was calibrated "
                             f"for {planned}; set max_steps <= {planned}.")
        if not self.optimizer.budget_allows_another_step():
            raise PrivacyBudgetExceeded(f"the privacy budget max_epsilon={self.optimizer.plan.max_epsilon} is spent "
                                        f"({self.optimizer.privacy_spent()[0]:.4g}); training cannot continue.")
        self._drop_unfinished_step()
        self.sampler.next_step = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self.probe is not None and not self.probe.done:
            warnings.warn("the one-off check that rows are examples (check_examples) never ran: no training "
                          "micro-batch on this process had 2 or more examples. Run optimizer.check_examples on a "
                          "batch yourself.", UserWarning, stacklevel=2)

    def on_step_begin(self, args, state, control, **kwargs):
        self._drop_unfinished_step()

    def _drop_unfinished_step(self) -> None:
        """Clipped sums of a logical step that never reached optimizer.step() (an exception, an
        early stop between micro-batches) must not join the next step: its examples may be drawn again."""
        if self.optimizer.stats.backward_passes:
            warnings.warn("prism: discarding the clipped gradients of an unfinished step", RuntimeWarning, stacklevel=2)
            self.optimizer.zero_grad()

    def on_step_end(self, args, state, control, **kwargs):
        self._check_in_step(state, "after a step")
        if not self.optimizer.budget_allows_another_step():
            logger.warning("prism: stopping, another step would exceed max_epsilon=%s", self.optimizer.plan.max_epsilon)
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        extra = {"epsilon": self.optimizer.privacy_spent()[0]}
        for entry in [logs] + ([state.log_history[-1]] if state.log_history else []):
            for key in UNNOISED_LOG_KEYS:
                entry.pop(key, None)
            entry.update(extra)

    def _check_in_step(self, state, when: str) -> None:
        if self.optimizer.steps_taken != state.global_step:
            raise RuntimeError(
                f"the optimizer has taken {self.optimizer.steps_taken} private steps but the Trainer is at step "
                f"{state.global_step} {when}; the accountant would not match the training. Resume from a "
                "checkpoint saved with its optimizer state (do not set save_only_model=True), and build a new "
                "optimizer and trainer for each new training run.")
