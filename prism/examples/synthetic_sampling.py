"""Sampling synthetic reviews from a generator, and the filters that decide which samples are kept.

Sampling settings (SamplingConfig, fixed for every generator of the study): nucleus sampling with
temperature 1.0 and top-p 0.95, at most 48 new tokens (95 % of the real training sentences are at most 45 tokens), batches of
32 prompts (left-padded), seeded; LoRA merged into the weights first (the same function, faster).

Filters, in this order; each looks at the sample alone or at the other samples, NEVER at private data,
so keeping or dropping a sample is post-processing of the released generator:
  1. "unfinished": the generator did not end the sample (no end-of-sequence token within the token budget);
  2. cleaning (not a filter): the text up to its first newline, stripped of spaces and of one pair of
     enclosing quotes;
  3. "no letters": nothing alphabetic left;
  4. "scaffolding": the text repeats the prompt's format ("Sentiment:" or "Review:");
  5. "too short" / "too long": fewer than 3 or more than 50 words (the real sentences have 1-60 words,
     most 5-35; the bounds are round numbers, not fitted to them);
  6. "duplicate": the same text (case and spacing ignored) was already kept, for either label.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable

import torch

LABELS = ("negative", "positive")  # label 0, 1
SCAFFOLDING = ("sentiment:", "review:")


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 48
    batch_size: int = 32  # generation stops when a whole batch has ended: smaller batches waste fewer steps
    min_words: int = 3
    max_words: int = 50
    require_end: bool = True  # filter 1
    max_rounds: int = 8  # give up after generating max_rounds x the samples asked for, per label

    @classmethod
    def quick(cls) -> "SamplingConfig":
        """For smoke tests of untrained tiny models, which rarely end a sample: short, unfinished kept."""
        return cls(max_new_tokens=8, batch_size=8, min_words=1, require_end=False)


def clean(text: str) -> str:
    """The text up to its first newline, stripped, without one pair of enclosing quotes."""
    text = text.split("\n", 1)[0].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def dedupe_key(text: str) -> str:
    return " ".join(text.lower().split())


def rejection(text: str, finished: bool, config: SamplingConfig) -> str | None:
    """Why a cleaned sample is dropped (filters 1 and 3-5 of the module docstring), or None to keep it."""
    if config.require_end and not finished:
        return "unfinished"
    if not re.search(r"[^\W\d_]", text):
        return "no letters"
    if any(s in text.lower() for s in SCAFFOLDING):
        return "scaffolding"
    words = len(text.split())
    if words < config.min_words:
        return "too short"
    if words > config.max_words:
        return "too long"
    return None


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], config: SamplingConfig) -> list[tuple[str, bool]]:
    """(decoded continuation, ended with end-of-sequence) for each prompt (token ids), in batches.

    Prompts are left-padded so that every continuation starts right after its own prompt.
    """
    model.eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out = []
    for start in range(0, len(prompts), config.batch_size):
        rows = prompts[start:start + config.batch_size]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        new = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=config.temperature,
                             top_p=config.top_p, top_k=0, max_new_tokens=config.max_new_tokens, pad_token_id=pad,
                             eos_token_id=eos)[:, width:]
        for row in new.tolist():
            finished = eos in row
            text = tokenizer.decode(row[:row.index(eos)] if finished else row, skip_special_tokens=True)
            out.append((text, finished))
    return out


def sample_balanced(model, tokenizer, prompt: Callable[[int], str] | None, n: int, config: SamplingConfig,
                    seed: int = 0, prompt_ids: Callable[[int], list[int]] | None = None) -> tuple[list[dict], dict]:
    """n filtered samples, n / 2 per label, as rows {"text", "label"}, with a report of what was dropped.

    Each label's prompt is `prompt(label)` (plain text, tokenized as the trainer did) or `prompt_ids(label)`
    (token ids, e.g. a chat template). One progress line per batch. Raises RuntimeError if a label still lacks
    samples after config.max_rounds x n / 2 generations (the generator rarely produces acceptable text).
    """
    if n < 2 or n % 2:
        raise ValueError(f"n must be an even number >= 2 (half per label), got {n}")
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("give exactly one of prompt (text) or prompt_ids (token ids)")
    if prompt_ids is None:
        def prompt_ids(label):
            return tokenizer(prompt(label))["input_ids"]
    torch.manual_seed(seed)
    per_label, kept, seen = n // 2, [], set()
    reasons, generated, start = Counter(), 0, time.time()
    for label, name in enumerate(LABELS):
        ids, count, budget = prompt_ids(label), 0, config.max_rounds * per_label
        tried = 0
        while count < per_label:
            if tried >= budget:
                raise RuntimeError(f"only {count} of {per_label} {name} samples passed the filters after {tried} "
                                   f"generations (dropped: {dict(reasons)}); the generator rarely produces acceptable "
                                   "text: train it longer, or relax SamplingConfig")
            batch = min(config.batch_size, math.ceil((per_label - count) * 1.25))  # a little extra for the filters
            for text, finished in generate(model, tokenizer, [ids] * batch, config):
                text = clean(text)
                reason = rejection(text, finished, config)
                if reason is None and dedupe_key(text) in seen:
                    reason = "duplicate"
                if reason is not None:
                    reasons[reason] += 1
                elif count < per_label:
                    seen.add(dedupe_key(text))
                    kept.append(dict(text=text, label=label))
                    count += 1
            tried += batch
            generated += batch
            done = len(kept) / n
            print(f"  sampling {name}: {count}/{per_label} kept of {tried} generated; {len(kept)}/{n} in all, "
                  f"~{(time.time() - start) * (1 - done) / max(done, 1e-9) / 60:.1f} min left", flush=True)
    report = dict(settings=asdict(config), seed=seed, generated=generated, kept=len(kept), dropped=dict(reasons),
                  sampling_seconds=round(time.time() - start, 1))
    return kept, report


def chat_prompt_ids(tokenizer, instruction: str, prefix: str = "") -> list[int]:
    """The chat template with one user turn and the assistant's turn opened (and started with `prefix`)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    return list(ids) + (tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else [])
