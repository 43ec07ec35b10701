"""The Trainer's loss made per example: each example's loss from its own rows, reduced as the
optimizer's loss_reduction says, with the one-off check that rows are examples."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn
from transformers.models.auto import modeling_auto

from ...optim.base import DPLoRAOptimizer
from ...losses import (drop_labels_after_padding, per_example_causal_lm_loss, per_example_sequence_loss,
                       per_example_token_loss)
from .data import EMPTY_MICRO_BATCH, EXAMPLE_COUNT

PerExampleLoss = Callable[[object, Tensor], Tensor]
PerExampleForward = Callable[[nn.Module, dict], tuple[Tensor, object]]  # (model, batch) -> ((b,) losses, outputs)


class FirstBatchProbe:
    """Runs optimizer.check_examples once, on the first training micro-batch of >= 2 examples."""

    def __init__(self, optimizer: DPLoRAOptimizer, forward: PerExampleForward):
        self.optimizer = optimizer
        self.forward = forward
        self.done = False

    def __call__(self, model: nn.Module, inputs: dict) -> None:
        labels = inputs.get("labels")
        if self.done or EMPTY_MICRO_BATCH in inputs or labels is None or labels.shape[0] < 2:
            return
        self.optimizer.check_examples(inputs, lambda m, batch: self.forward(m, batch)[0])
        self.done = True


def compute_loss(optimizer: DPLoRAOptimizer, forward: PerExampleForward, evaluation_loss: Callable | None,
                 probe: FirstBatchProbe | None, model: nn.Module, inputs: dict, return_outputs: bool = False,
                 num_items_in_batch=None):
    """The Trainer's compute_loss after make_private. Training: the per-example losses of `forward`
    reduced as the optimizer's loss_reduction says (after the one-off probe). Evaluation (no
    gradient): the Trainer's own loss where the default per-example loss is in use, so eval_loss
    stays comparable with non-private runs; else the mean of the per-example losses (independent
    of loss_reduction)."""
    if torch.is_grad_enabled():
        if probe is not None:
            probe(model, inputs)
        return reduced_loss(optimizer, forward, model, inputs, return_outputs)
    if evaluation_loss is not None:  # num_items_in_batch only where given: older Trainers do not take it
        extra = {} if num_items_in_batch is None else dict(num_items_in_batch=num_items_in_batch)
        return evaluation_loss(model, inputs, return_outputs=return_outputs, **extra)
    losses, outputs = forward(model, inputs)
    return (losses.mean(), outputs) if return_outputs else losses.mean()


def per_example_compute_loss(optimizer: DPLoRAOptimizer, loss_fn: PerExampleLoss, model: nn.Module, inputs: dict,
                             return_outputs: bool = False, num_items_in_batch=None):
    """Trainer.compute_loss with per-example losses reduced as the optimizer's loss_reduction says.

    `num_items_in_batch` is ignored on purpose: a normaliser counted over the whole batch would
    couple the examples.
    """
    return reduced_loss(optimizer, functools.partial(per_example_losses, loss_fn), model, inputs, return_outputs)


def reduced_loss(optimizer: DPLoRAOptimizer, forward: PerExampleForward, model: nn.Module, inputs: dict,
                 return_outputs: bool = False):
    """The sum or mean (the optimizer's loss_reduction) of the per-example losses of `forward`,
    watched so that a factor applied later is divided out; 0 for an empty micro-batch."""
    if EMPTY_MICRO_BATCH in inputs:
        loss = torch.zeros((), device=inputs[EMPTY_MICRO_BATCH].device, requires_grad=True)
        return (loss, None) if return_outputs else loss
    losses, outputs = forward(model, inputs)
    loss = losses.sum() if optimizer.loss_reduction == "sum" else losses.mean()
    optimizer.watch_loss(loss)
    return (loss, outputs) if return_outputs else loss


def split_labels(inputs: dict) -> tuple[dict, Tensor]:
    """(the model's inputs, the labels) of a micro-batch, refusing one whose rows are not its examples."""
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    examples = inputs.pop(EXAMPLE_COUNT, None)
    if labels is None:
        raise ValueError("prism needs the labels in every batch (a 'labels' field) to form per-example losses.")
    if examples is not None and labels.shape[0] != int(examples):
        raise ValueError(f"the collator turned {int(examples)} examples into {labels.shape[0]} rows (padding-free "
                         "packing such as DataCollatorWithFlattening?); prism clips per row, so it needs one row "
                         "per example. Use a padding collator (e.g. DataCollatorWithPadding).")
    return inputs, labels


def per_example_losses(loss_fn: PerExampleLoss, model: nn.Module, inputs: dict) -> tuple[Tensor, object]:
    """((b,) losses, the model's outputs) of a batch whose labels the model does not see."""
    inputs, labels = split_labels(inputs)
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
        causal_lm_loss.predicts_the_next_token = True  # per_example_losses drops labels predicted from padding
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
    """peft's task_type of the active adapter, else the task of the base model's class (or None)."""
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
