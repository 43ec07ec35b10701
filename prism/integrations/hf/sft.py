"""TRL's SFTTrainer through make_private, and the TRL trainers that are refused by name.

What SFTTrainer (trl 1.16) changes on top of transformers.Trainer, and what make_private does with it:
- `training_step` only enters an activation-offloading context around Trainer.training_step; it is
  accepted as is, and `activation_offloading=True` is refused (not verified with prism's hooks).
- `compute_loss` divides the summed token losses of the micro-batch by its token count (or by
  `num_items_in_batch`, the tokens of the whole step): each example's gradient would then depend on
  the other examples' lengths. make_private replaces it for training by a loss per example: the
  mean negative log-likelihood (or DFT-weighted loss, `loss_type="dft"`) over the example's own
  labelled tokens, from the same fused LM head SFTTrainer uses (per-token log-probabilities
  without the full logits). The labels are the ones SFTTrainer's dataset preparation built:
  -100 on prompt tokens (completion-only loss), outside assistant turns (assistant-only loss)
  and on padding, so both losses are honoured. Evaluation keeps SFTTrainer's own loss.
- It also logs entropy, token accuracy and a token count of each training batch; those are not
  private and are never computed (the replaced loss records none) and dropped from the logs.
- Packing and padding-free training put several examples in one row, so a row's gradient is not
  one example's: refused. So are the MoE load-balancing loss (a statistic over the batch's
  tokens), vision datasets and context / sequence / tensor parallelism.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ...losses import _at_least_fp32, drop_labels_after_padding
from ...optim.base import DPLoRAOptimizer
from .checks import check_dataset, check_loss_path
from .losses import PerExampleForward, PerExampleLoss, default_per_example_loss, per_example_losses, split_labels

SUPPORTED_TRL_TRAINERS = ("SFTTrainer",)
_WHY_REFUSED = {
    "DPOTrainer": "each example is a chosen and a rejected completion, run as two rows of one batch, so rows are not "
                  "examples",
    "RewardTrainer": "each example is a chosen and a rejected completion, run as two rows of one batch, so rows are "
                     "not examples",
    "KTOTrainer": "its loss uses a KL estimate computed over the whole batch, which couples the examples",
    "GRPOTrainer": "it normalises each completion's reward over the group of completions of its prompt, which "
                   "couples the examples, and it trains on generated rows rather than dataset examples",
    "RLOOTrainer": "its baseline for each completion is the mean reward of the other completions of its prompt, "
                   "which couples the examples, and it trains on generated rows rather than dataset examples",
}
_NOT_PER_ROW = ("prism clips each row's gradient, so every row must be one example; the Poisson sampler must also draw "
                "examples, not packed rows.")


def trl_trainer_name(trainer) -> str | None:
    """The name of the TRL class `trainer` is built on (the most derived class defined in trl), or None."""
    for cls in type(trainer).__mro__:
        if cls.__module__.split(".")[0] == "trl":
            return cls.__name__
    return None


def is_supported_trl_trainer(trainer) -> bool:
    """True for trl.SFTTrainer (and subclasses), False for a trainer not from TRL; raise for other TRL trainers."""
    name = trl_trainer_name(trainer)
    if name is None:
        return False
    if name not in SUPPORTED_TRL_TRAINERS:
        why = _WHY_REFUSED.get(name, "prism does not know how its loss and batches map to examples")
        raise TypeError(f"make_private does not support TRL's {name}: {why}. Supported: transformers.Trainer and "
                        f"trl.{', trl.'.join(SUPPORTED_TRL_TRAINERS)} (supervised fine-tuning on prompt-completion, "
                        "conversational or plain-text data).")
    return True


def check_sft_trainer(trainer, optimizer: DPLoRAOptimizer, per_example_loss: PerExampleLoss | None) -> None:
    """Raise for SFTTrainer settings under which rows are not examples or the loss cannot be made per example."""
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    check_loss_path(trainer, per_example_loss, base=SFTTrainer, base_name="trl.SFTTrainer")
    args = trainer.args
    if args.packing:
        raise ValueError("SFTConfig(packing=True) is not supported with prism: it concatenates several examples into "
                         f"each training row. {_NOT_PER_ROW} Set SFTConfig(packing=False, padding_free=False).")
    padding_free = args.padding_free or getattr(trainer, "padding_free", False) or getattr(
        trainer.data_collator, "padding_free", False)
    if padding_free:
        raise ValueError("padding-free training (SFTConfig(padding_free=True)) is not supported with prism: it "
                         f"flattens a micro-batch's examples into one row. {_NOT_PER_ROW} Set "
                         "SFTConfig(packing=False, padding_free=False).")
    if "seq_lengths" in (getattr(trainer.train_dataset, "column_names", None) or ()):
        raise ValueError("train_dataset has a 'seq_lengths' column: its rows were packed from several examples. "
                         f"{_NOT_PER_ROW} Pass the examples unpacked, with "
                         "SFTConfig(packing=False, padding_free=False).")
    refused = {
        "activation_offloading": (args.activation_offloading, "not verified with prism's per-example hooks"),
        "router_aux_loss_coef": (getattr(trainer, "aux_loss_enabled", False),
                                 "the mixture-of-experts load-balancing loss is a statistic over all tokens of the "
                                 "batch, which couples the examples; set router_aux_loss_coef=0.0"),
    }
    for name, (bad, why) in refused.items():
        if bad:
            raise ValueError(f"SFTConfig.{name} is not supported with prism: {why}.")
    if isinstance(trainer.data_collator, DataCollatorForVisionLanguageModeling):
        raise ValueError("vision-language datasets are not supported with prism's SFTTrainer integration (image "
                         "features need not be one row per example); train on text.")
    parallel = trainer.accelerator.parallelism_config
    if parallel is not None and (parallel.cp_enabled or parallel.sp_enabled or parallel.tp_enabled):
        raise ValueError("context, sequence and tensor parallelism split one example over several processes, so no "
                         "process holds an example's whole gradient to clip; use data parallelism (torchrun).")
    try:
        check_dataset(trainer, optimizer)
    except ValueError as error:
        raise ValueError(f"{error} SFTTrainer drops the examples that truncation to max_length leaves without a "
                         "trained token: build the SFTTrainer without an optimizer, then the optimizer with "
                         "dataset_size=len(trainer.train_dataset), set trainer.optimizer to it and call make_private "
                         "(or raise max_length).") from None


def sft_loss_path(trainer, per_example_loss: PerExampleLoss | None) -> tuple[PerExampleForward, object]:
    """(the training forward giving (b,) losses, the evaluation loss or None) of an SFTTrainer."""
    evaluation_loss = trainer.compute_loss  # SFTTrainer's own, for eval_loss and its eval metrics
    if per_example_loss is not None:
        return functools.partial(per_example_losses, per_example_loss), None
    smoothing = trainer.args.label_smoothing_factor
    if smoothing and trainer.args.loss_type == "nll":  # needs the full logits, as in SFTTrainer
        smoothed = default_per_example_loss(trainer.model, smoothing)
        return functools.partial(per_example_losses, smoothed), evaluation_loss
    return functools.partial(fused_per_example_losses, trainer.args.loss_type), evaluation_loss


def sft_per_example_loss(model: nn.Module, batch: dict, loss_type: str = "nll") -> Tensor:
    """(b,) losses of a batch from SFTTrainer's collator, as make_private trains an SFTTrainer:
    each example's mean token loss over its own labelled tokens (labels != -100).

    Args:
        model: the SFTTrainer's model (SFTTrainer gave it its fused LM head).
        batch: input_ids, attention_mask and labels (b, T), right or left padded.
        loss_type: SFTConfig.loss_type, "nll" or "dft" (token losses weighted by their detached probability).
    """
    return fused_per_example_losses(loss_type, model, batch)[0]


def fused_per_example_losses(loss_type: str, model: nn.Module, inputs: dict) -> tuple[Tensor, object]:
    """((b,) losses, the fused outputs) through the fused LM head SFTTrainer adds to its model."""
    inputs, labels = split_labels(inputs)
    if torch.is_tensor(inputs.get("attention_mask")):  # left padding: see prism.losses.drop_labels_after_padding
        labels = drop_labels_after_padding(labels, inputs["attention_mask"])
    outputs = model(**inputs, labels=labels, fused_lm_head=True, use_cache=False)
    log_probs = getattr(outputs, "log_probs", None)
    if log_probs is None:
        raise ValueError(f"{type(model).__name__} has no fused LM head (SFTTrainer adds one to the model it is given); "
                         "pass the SFTTrainer's own model, or make_private(trainer, per_example_loss=...).")
    log_probs = _at_least_fp32(log_probs)
    token_loss = -log_probs  # zero where the label is -100
    if loss_type == "dft":
        token_loss = token_loss * log_probs.exp().detach()
    elif loss_type != "nll":
        raise ValueError(f"loss_type={loss_type!r} is not supported; use 'nll' or 'dft'.")
    return token_loss.sum(1) / outputs.label_mask.sum(1).clamp(min=1), outputs
