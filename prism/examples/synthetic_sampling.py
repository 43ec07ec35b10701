"""Sampling synthetic reviews from a generator, and the filters that decide which samples are kept.

Sampling settings (SamplingConfig, fixed for every generator of the study): nucleus sampling with
temperature 1.0 and top-p 0.95, at most 48 new tokens (95 % of the real training sentences are at most
45 tokens), batches of 32 prompts (left-padded), seeded; LoRA merged into the weights first (the same function, faster).

Filters, in this order; each looks at the sample alone or at the other samples, NEVER at private data,
so keeping or dropping a sample is post-processing of the released generator:
  1. "unfinished": the generator did not end the sample (no end-of-sequence token within the token budget);
  2. cleaning (not a filter): the text up to its first newline, stripped of spaces and of one pair of
     enclosing quotes;
  3. "no letters": nothing alphabetic left;
  4. "scaffolding": the text repeats the prompt's format (SamplingConfig.scaffolding: the template's words,
     "Sentiment:" or "Review:" for the study);
  5. "too short" / "too long": fewer than 3 or more than 50 words (the real sentences have 1-60 words,
     most 5-35; the bounds are round numbers, not fitted to them);
  6. "duplicate": the same text (case and spacing ignored) was already kept, for either label;
  7. optional, "label mismatch": a public judge (PublicLabelJudge: the UNTUNED instruct model as a zero-shot
     classifier) reads the sample as another label. A DP generator trained briefly learns the style of the
     data before its label conditioning; this filter keeps the samples whose label a public model agrees with.
     It adds the public model's knowledge to the set (compare with the zero-shot generator filtered alike).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from .synthetic_data import SENTIMENT, Template


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
    scaffolding: tuple[str, ...] = SENTIMENT.scaffolding  # filter 4: the template's format words, lower-cased

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


def last_token_logits(model, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """(len(rows), vocab) next-token logits after each row's last token. The rows are right-padded into one
    masked batch on the model's device; the model is called as a whole (prism counts its forward passes) and
    its LM head runs only on the distinct last positions (logits_to_keep)."""
    device = next(model.parameters()).device
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    positions, column = torch.unique(torch.tensor([len(r) - 1 for r in rows], device=device), return_inverse=True)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=positions).logits
    return logits[torch.arange(len(rows), device=device), column]


class PublicLabelJudge:
    """A public zero-shot classifier: the untuned causal LM, prompted with the template read backwards
    ("Review: <text>\\nSentiment:" for the study), predicts the label whose name's first token (" negative",
    " positive") is the most likely next token. The label names must start with distinct tokens.

    It must be a model that never saw the private data (the released base model), so that filtering by it
    stays post-processing.
    """

    def __init__(self, model, tokenizer, template: Template = SENTIMENT, batch_size: int = 32, max_length: int = 96):
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length
        self.prefix, self.suffix, answers = template.reading_prompt
        first = [tokenizer(a, add_special_tokens=False)["input_ids"][:1] for a in answers]
        if any(not f for f in first) or len({f[0] for f in first}) != len(first):
            raise ValueError(f"the judge tells labels apart by their first token, and {answers} do not all start "
                             "with distinct tokens of this tokenizer: rename the labels or drop the label filter")
        self.answer_ids = torch.tensor([f[0] for f in first])

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[int]:
        """The predicted label of each text (right-padded batches, read at each prompt's last token; the LM head
        runs on those positions only)."""
        was_training = self.model.training
        self.model.eval()
        suffix = self.tokenizer(self.suffix, add_special_tokens=False)["input_ids"]
        pad = self.tokenizer.pad_token_id or 0  # right padding, masked: any id
        predictions = []
        for start in range(0, len(texts), self.batch_size):
            rows = [self.tokenizer(self.prefix + t, add_special_tokens=False)["input_ids"][:self.max_length] + suffix
                    for t in texts[start:start + self.batch_size]]
            logits = last_token_logits(self.model, rows, pad)
            predictions += logits[:, self.answer_ids.to(logits.device)].argmax(-1).tolist()
        self.model.train(was_training)
        return predictions


def judge_filter(rows: list[dict], judge: Callable[[list[str]], list[int]],
                 labels: Sequence[str] = SENTIMENT.labels) -> tuple[list[dict], dict]:
    """The rows whose label the judge agrees with, balanced (the first rows of each label, as many as the
    scarcest label keeps), and a report: per label name, how many the judge agreed with."""
    predicted = judge([r["text"] for r in rows])
    agreed = [[r for r, p in zip(rows, predicted, strict=True) if r["label"] == label == p]
              for label in range(len(labels))]
    keep = min(map(len, agreed))
    if keep == 0:
        raise ValueError(f"the judge agreed with no sample of some label ({[len(a) for a in agreed]} per label of "
                         f"{len(rows)}): nothing balanced is left; check the judge and the samples' labels")
    kept = [r for label_rows in agreed for r in label_rows[:keep]]
    report = {name: dict(samples=sum(r["label"] == label for r in rows), agreed=len(agreed[label]))
              for label, name in enumerate(labels)}
    return kept, dict(per_label=report, kept=len(kept))


def rejection(text: str, finished: bool, config: SamplingConfig) -> str | None:
    """Why a cleaned sample is dropped (filters 1 and 3-5 of the module docstring), or None to keep it."""
    if config.require_end and not finished:
        return "unfinished"
    if not re.search(r"[^\W\d_]", text):
        return "no letters"
    if any(s in text.lower() for s in config.scaffolding):
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
                    seed: int = 0, prompt_ids: Callable[[int], list[int]] | None = None,
                    judge: Callable[[list[str]], list[int]] | None = None,
                    labels: Sequence[str] | None = SENTIMENT.labels) -> tuple[list[dict], dict]:
    """n filtered samples, n / len(labels) per label, as rows {"text", "label" (index into labels)}, with a
    report of what was dropped. `labels=None`: n unconditional samples, rows {"text"}, prompt(None).

    Each label's prompt is `prompt(label)` (plain text, tokenized as the trainer did) or `prompt_ids(label)`
    (token ids, e.g. a chat template). `judge` (e.g. PublicLabelJudge; it must not have seen private data)
    predicts each sample's label: samples it reads as another label are dropped. One progress line per
    batch. Raises RuntimeError if a label still lacks samples after config.max_rounds x (its share of n)
    generations (the generator rarely produces acceptable text).
    """
    groups = [(None, "unlabelled")] if labels is None else list(enumerate(labels))
    if n < len(groups) or n % len(groups):
        raise ValueError(f"n must be a positive multiple of the number of labels ({len(groups)}), got {n}")
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("give exactly one of prompt (text) or prompt_ids (token ids)")
    if judge is not None and labels is None:
        raise ValueError("a label judge needs labels: unconditional samples have none to check")
    if prompt_ids is None:
        def prompt_ids(label):
            return tokenizer(prompt(label))["input_ids"]
    torch.manual_seed(seed)
    per_label, kept, seen = n // len(groups), [], set()
    reasons, generated, start = Counter(), 0, time.time()
    for label, name in groups:
        ids, count, budget = prompt_ids(label), 0, config.max_rounds * per_label
        tried = 0
        while count < per_label:
            if tried >= budget:
                raise RuntimeError(f"only {count} of {per_label} {name} samples passed the filters after {tried} "
                                   f"generations (dropped: {dict(reasons)}); the generator rarely produces acceptable "
                                   "text: train it longer, or relax SamplingConfig")
            batch = min(config.batch_size, math.ceil((per_label - count) * 1.25))  # a little extra for the filters
            out = generate(model, tokenizer, [ids] * batch, config)
            texts = [clean(text) for text, _ in out]
            reasons_now = [rejection(text, finished, config) for text, (_, finished) in zip(texts, out)]
            survivors = [t for t, r in zip(texts, reasons_now) if r is None]  # only these need the judge
            verdicts = judge(survivors) if judge is not None else [label] * len(survivors)
            if len(verdicts) != len(survivors):
                raise ValueError(f"the judge returned {len(verdicts)} labels for {len(survivors)} texts: it must "
                                 "return one label per text, in order")
            verdicts = iter(verdicts)
            for text, reason in zip(texts, reasons_now):
                verdict = next(verdicts) if reason is None else None
                if reason is None and dedupe_key(text) in seen:
                    reason = "duplicate"
                if reason is None and verdict != label:
                    reason = "label mismatch"
                if reason is not None:
                    reasons[reason] += 1
                elif count < per_label:
                    seen.add(dedupe_key(text))
                    kept.append(dict(text=text) if label is None else dict(text=text, label=label))
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
