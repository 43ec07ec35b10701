"""Per-example losses: each example's loss must depend on that example alone.

Hugging Face's causal-LM loss is a token mean over the WHOLE batch, which couples examples
(each example's gradient is scaled by the batch's total token count). Use these instead.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def per_example_causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy of each example over its own non-ignored tokens.

    Args:
        logits: (b, T, vocab). labels: (b, T), with `ignore_index` on padding and prompt tokens.

    Returns:
        (b,) losses; an example without any counted token has loss 0 (and zero gradient).
        Sum them (loss_reduction="sum") or average them over the micro-batch ("mean").
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=ignore_index,
                                 reduction="none")
    counts = (shift_labels != ignore_index).sum(1)
    return token_loss.sum(1) / counts.clamp_min(1)
