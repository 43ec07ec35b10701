"""A toy task for privacy audits: a bag-of-tokens classifier with one LoRA layer, its training
data, and canaries that each repeat a token no other example uses, with a random label.

The layer sees token frequencies (one-hot means), so a canary's gradient touches only its own
input column of the weight: canaries barely interfere with each other or with the data, which
makes a one-run audit on the final model about as strong as it gets.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F


class BagOfTokens(nn.Module):
    """logits = W mean_t onehot(x_t), with W: (classes, vocab) an nn.Linear without bias."""

    def __init__(self, vocab: int, classes: int):
        super().__init__()
        self.vocab = vocab
        self.proj = nn.Linear(vocab, classes, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(F.one_hot(input_ids, self.vocab).float().mean(1))


def audit_task(n: int, m: int, *, classes: int = 8, data_tokens: int = 64, seq_len: int = 8, r: int = 4,
               seed: int = 0):
    """(peft model, data (X, y), canaries (X_c, y_c)).

    Data: n sequences whose tokens come mostly (70%) from their class's block of data_tokens /
    classes tokens, otherwise from any data token. Canary i repeats token data_tokens + i.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    block = data_tokens // classes
    X = torch.randint(0, block, (n, seq_len), generator=g) + block * y[:, None]
    stray = torch.rand(n, seq_len, generator=g) < 0.3
    X = torch.where(stray, torch.randint(0, data_tokens, (n, seq_len), generator=g), X)
    canary_X = (data_tokens + torch.arange(m))[:, None].repeat(1, seq_len)
    canary_y = torch.randint(0, classes, (m,), generator=g)
    model = get_peft_model(BagOfTokens(data_tokens + m, classes),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], init_lora_weights="pissa"))
    return model, (X, y), (canary_X, canary_y)


def per_example_loss(model: nn.Module, batch) -> torch.Tensor:
    """(b,) cross-entropy losses of a batch (X, y)."""
    return F.cross_entropy(model(input_ids=batch[0]), batch[1], reduction="none")
