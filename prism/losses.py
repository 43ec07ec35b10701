"""Per-example losses: each example's loss must depend on that example alone.

Hugging Face's losses are means over the WHOLE batch (for causal LM, over all its tokens),
which couples examples: each example's gradient is scaled by the batch's total token count.
These return one loss per example, shape (b,); sum them (loss_reduction="sum") or average them
over the micro-batch ("mean").
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def _at_least_fp32(t: Tensor) -> Tensor:
    """Losses in fp32 (fp64 stays fp64): low-precision logits lose the per-example loss's precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def per_example_token_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                           label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of each example over its own labelled tokens (token classification).

    Args:
        logits: (b, T, classes). labels: (b, T), `ignore_index` on padding and unlabelled tokens.
        label_smoothing: as in torch.nn.functional.cross_entropy.

    Returns:
        (b,) losses; an example without any labelled token has loss 0 (and zero gradient).
    """
    token_loss = F.cross_entropy(_at_least_fp32(logits).transpose(1, 2), labels, ignore_index=ignore_index,
                                 reduction="none", label_smoothing=label_smoothing)
    return token_loss.sum(1) / (labels != ignore_index).sum(1).clamp_min(1)


def per_example_causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                               label_smoothing: float = 0.0, attention_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy of each example over its own non-ignored tokens: token t's
    logits predict label t+1 (labels are aligned with the inputs, as Hugging Face's are).

    Args:
        logits: (b, T, vocab). labels: (b, T), with `ignore_index` on padding and prompt tokens.
        label_smoothing: as in torch.nn.functional.cross_entropy.
        attention_mask: (b, T), 0 on padding. Labels predicted from a padding position are then
            ignored (see `drop_labels_after_padding`); needed with left padding.
    """
    if attention_mask is not None:
        labels = drop_labels_after_padding(labels, attention_mask, ignore_index)
    return per_example_token_loss(logits[:, :-1], labels[:, 1:], ignore_index, label_smoothing)


def drop_labels_after_padding(labels: Tensor, attention_mask: Tensor, ignore_index: int = -100) -> Tensor:
    """`labels` with `ignore_index` wherever the position before is padding.

    With left padding, an example's first token is predicted from the padding before it, but only
    when the example is shorter than the batch's longest (which has no padding): that term makes
    each example's loss depend on the other examples. Without it the loss is the same however far
    the batch is padded. Right padding is unchanged (labels after padding are ignored already).
    """
    after_padding = torch.zeros_like(labels, dtype=torch.bool)
    after_padding[:, 1:] = attention_mask[:, :-1] == 0
    return labels.masked_fill(after_padding, ignore_index)


def per_example_sequence_loss(logits: Tensor, labels: Tensor, problem_type: str | None = None,
                              label_smoothing: float = 0.0) -> Tensor:
    """(b,) losses of sequence classification, by the model config's problem_type (None: inferred
    as Hugging Face does: regression for one output, single-label classification for integer
    labels, else multi-label classification).

    regression: mean squared error over the outputs; multi_label_classification: mean binary
    cross-entropy over the labels; single_label_classification: cross-entropy.
    """
    b = labels.shape[0]
    if problem_type is None:
        if logits.shape[-1] == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        return (_at_least_fp32(logits).reshape(b, -1) - _at_least_fp32(labels).reshape(b, -1)).square().mean(1)
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(_at_least_fp32(logits), _at_least_fp32(labels),
                                                  reduction="none").mean(1)
    return F.cross_entropy(_at_least_fp32(logits), labels, reduction="none", label_smoothing=label_smoothing)
