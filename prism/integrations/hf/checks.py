"""What make_private checks before it changes a Trainer: the optimizer, the model, the dataset,
the loss path and the TrainingArguments; each refusal names the problem and the fix."""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn
from transformers import Trainer

from ...optim.base import DPLoRAOptimizer
from .losses import PerExampleLoss

logger = logging.getLogger(__name__)


def prism_optimizer(trainer) -> DPLoRAOptimizer:
    """The trainer's prism optimizer (unwrapped from accelerate), which must be able to account."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate may have wrapped it
    if not isinstance(optimizer, DPLoRAOptimizer):
        raise TypeError("make_private needs a prism optimizer: build the Trainer with "
                        "optimizers=(prism.PRISM(model, ...), None); got "
                        f"{type(optimizer).__name__ if optimizer is not None else 'no optimizer'}.")
    if optimizer.accountant is None or optimizer.plan.delta is None:
        raise ValueError("the optimizer cannot account: build it with dataset_size=len(train_dataset) (or "
                         "sample_rate) and delta, so the Trainer can report epsilon.")
    return optimizer


def check_model(model: nn.Module, optimizer: DPLoRAOptimizer) -> None:
    """Raise unless the optimizer's hooked modules are the Trainer model's."""
    modules = {id(m) for m in model.modules()}
    hooked = [pair.lora_A for pair in optimizer.pairs] + [d.module for d in optimizer.dense]
    if not all(id(m) in modules for m in hooked):
        raise ValueError("the optimizer was built on a different model than the Trainer's; build it with "
                         "prism.PRISM(trainer_model, ...).")


def check_dataset(trainer, optimizer: DPLoRAOptimizer) -> int:
    """The size N of train_dataset, a map-style dataset of the size the optimizer's rate was set for."""
    dataset = trainer.train_dataset
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError("Poisson sampling needs a train_dataset with a length and random access (a map-style "
                         "dataset); streaming / IterableDataset cannot be sampled privately.")
    size = len(dataset)
    optimizer.plan.check_dataset_size(size, what="train_dataset")
    return size


def check_loss_path(trainer, per_example_loss: PerExampleLoss | None, base: type = Trainer,
                    base_name: str = "transformers.Trainer") -> None:
    """Refuse a training_step prism cannot see through, and a custom loss that has no per-example version
    (`base`: the trainer class whose training_step and compute_loss prism knows)."""
    if type(trainer).training_step is not base.training_step:
        raise ValueError(f"{type(trainer).__name__} overrides training_step; prism cannot check that each example's "
                         f"gradient comes from its own loss. Use {base_name} (or a subclass that keeps it).")
    custom = type(trainer).compute_loss is not base.compute_loss or trainer.compute_loss_func is not None
    if custom and per_example_loss is None:
        raise ValueError(f"{type(trainer).__name__} has its own compute_loss or compute_loss_func, which prism must "
                         "replace by a loss computed per example. Pass per_example_loss=... to make_private: your "
                         "loss as a function (outputs, labels) -> one loss per example (see prism.losses), or "
                         "prism.hf.default_per_example_loss(model) if the default loss is what you want.")
    if per_example_loss is not None and trainer.args.label_smoothing_factor:
        warnings.warn("label_smoothing_factor is not applied to a custom per_example_loss; apply it there.",
                      UserWarning, stacklevel=3)


def adjusted_arguments(args, optimizer: DPLoRAOptimizer):
    """A copy of the TrainingArguments set up for private training (the caller's stay as given, to
    be reused across runs): refuses what prism cannot make private, switches off the Trainer's own
    clipping and data skipping, and caps max_steps at the steps the noise was calibrated for."""
    args = copy.copy(args)
    _refuse_unsupported(args, optimizer)
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
        return args
    if args.max_steps is None or args.max_steps <= 0:
        logger.info("prism: max_steps set to %d, the steps the optimizer was calibrated for", planned)
        args.max_steps = planned
    elif args.max_steps > planned:
        raise ValueError(f"TrainingArguments.max_steps={args.max_steps} exceeds the {planned} steps the optimizer's "
                         f"noise was calibrated for; set max_steps <= {planned} or rebuild the optimizer with "
                         f"steps={args.max_steps}.")
    return args


def _refuse_unsupported(args, optimizer: DPLoRAOptimizer) -> None:
    """Raise for arguments prism cannot make private; warn that push_to_hub publishes the loss."""
    if args.n_gpu > 1:
        raise NotImplementedError("DataParallel (several GPUs in one process) is not supported; launch one process "
                                  "per GPU with torchrun (prism sums the clipped gradients over processes).")
    if args.deepspeed or args.fsdp:
        raise NotImplementedError("DeepSpeed and the Trainer's FSDP (accelerate) are not supported with make_private: "
                                  "they wrap the model and reduce its non-private gradients themselves. Use plain data "
                                  "parallel (torchrun without --deepspeed / --fsdp), or, to shard a large model, FSDP2 "
                                  "in your own loop under torchrun: fully_shard the decoder layers and the root, then "
                                  "build the prism optimizer (docs/usage.md, 'Sharded models (FSDP2)').")
    refused = {
        "include_num_input_tokens_seen": (args.include_num_input_tokens_seen not in (False, None, "no"),
                                          "it logs the token count of each private batch without noise"),
        "neftune_noise_alpha": (args.neftune_noise_alpha is not None,
                                "its noise scale depends on the longest sequence of the micro-batch, coupling examples"),
        "auto_find_batch_size": (bool(args.auto_find_batch_size),
                                 "its retries would rerun part of a private step; set gradient_accumulation_steps"),
        "hub_strategy": (bool(args.push_to_hub) and str(getattr(args.hub_strategy, "value", args.hub_strategy))
                         in ("checkpoint", "all_checkpoints"),
                         "it uploads checkpoints, which hold non-private state: the noise generator's state "
                         "(unless generator='secure'), the last realised Poisson batch sizes and the un-noised "
                         "training loss (trainer_state.json); use hub_strategy='end'"),
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
                      "not private.", UserWarning, stacklevel=4)
    if args.fp16:
        raise ValueError("fp16 with a gradient scaler is not supported (the scaler needs the non-private "
                         "gradients prism drops); use bf16=True, or fp32.")
