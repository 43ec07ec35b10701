"""benchmarks.llm_tasks.accuracy: a model that always gives the majority answer scores its share, not more."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from benchmarks.llm_tasks import Encoded, accuracy


class EchoLastToken(nn.Module):
    """Next-token logits: one-hot of the last token of each row, or of `constant` for every row."""

    def __init__(self, vocab: int, constant: int | None = None):
        super().__init__()
        self.vocab, self.constant = vocab, constant
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, logits_to_keep):
        chosen = input_ids if self.constant is None else torch.full_like(input_ids, self.constant)
        logits = nn.functional.one_hot(chosen, self.vocab).float()[:, logits_to_keep]
        return SimpleNamespace(logits=logits)


def test_balanced_accuracy_and_prediction_shares_expose_a_constant_answer():
    answers = [3, 7]
    labels = [0, 0, 0, 0, 0, 0, 1, 1]  # 75 % majority
    enc = Encoded(ids=[[1, 2, answers[y]] if i % 2 else [5, answers[y]] for i, y in enumerate(labels)], labels=labels)
    perfect = accuracy(EchoLastToken(10), enc, answers, pad_id=0, batch_size=3)
    assert perfect["accuracy"] == 1.0 and perfect["balanced_accuracy"] == 1.0
    assert perfect["predicted_share"] == pytest.approx([0.75, 0.25])
    constant = accuracy(EchoLastToken(10, constant=answers[0]), enc, answers, pad_id=0, batch_size=3)
    assert constant["accuracy"] == 0.75 and constant["balanced_accuracy"] == 0.5
    assert constant["predicted_share"] == [1.0, 0.0]
