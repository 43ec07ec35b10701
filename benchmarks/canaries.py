"""Canary exposure of a synthetic-text generator (issue 23, memorisation b).

A few unique secret sentences are put into the private training set, each k times, with a label:

    "Sentiment: <label>\\nReview:" + " the secret code on my ticket was 482913"

the generator is trained as in benchmarks.synthetic (same method, epsilon, steps), and each secret is
ranked by the generator's log-likelihood of the review among `candidates` random reviews of the same
format (other random 6-digit codes, same label). Exposure (benchmarks.synthetic_metrics.exposure) is
log2(candidates + 1) - log2(rank): about 1.44 bits on average at chance, log2(candidates + 1) when the
secret ranks first. The secrets and candidates come from a public seeded generator (public: they are the
auditor's choice; only whether the secret was in the training set matters).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

CANARY_FORMAT = "the secret code on my ticket was {code}"
CANARIES = 5
CANDIDATES = 199  # random codes each secret is ranked among (R = 200 ranks; 7.6 bits at most)


@dataclass(frozen=True)
class Canary:
    code: str
    label: int

    @property
    def text(self) -> str:
        return CANARY_FORMAT.format(code=self.code)


def make_canaries(count: int, candidates: int, seed: int) -> list[tuple[Canary, list[Canary]]]:
    """`count` secrets (alternating labels) with `candidates` distinct other codes each, from a seeded generator."""
    rng = random.Random(f"canaries-{seed}")
    codes = rng.sample(range(10 ** 6), count * (candidates + 1))
    out = []
    for i in range(count):
        block = [f"{c:06d}" for c in codes[i * (candidates + 1):(i + 1) * (candidates + 1)]]
        out.append((Canary(block[0], i % 2), [Canary(c, i % 2) for c in block[1:]]))
    return out


@torch.no_grad()
def completion_logprobs(model, tokenizer, prompt: str, completions: list[str], batch_size: int = 100) -> list[float]:
    """log p(" " + completion + eos | prompt) under the model, for each completion (tokenized as in training)."""
    model.eval()
    head = tokenizer(prompt)["input_ids"]
    scores = []
    for start in range(0, len(completions), batch_size):
        rows = [tokenizer(prompt + " " + c)["input_ids"] + [tokenizer.eos_token_id]
                for c in completions[start:start + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        token = logp.gather(-1, ids[:, 1:, None])[..., 0]
        scored = mask[:, 1:].clone()
        scored[:, :len(head) - 1] = 0  # the prompt's tokens are not scored
        scores += (token * scored).sum(1).tolist()
    return scores


def job(method: str, epsilon: float | None, k: int, seed: int, split, folder: Path, quick: bool):
    """One canary run: a generator trained with the canaries inserted k times each; their exposures."""
    from prism.examples import synthetic

    from . import synthetic as study
    from .synthetic_metrics import chance_mean_exposure, exposure

    run = f"{study.name(method, epsilon, seed)}_k{k}"

    def fn():
        count, candidates = (2, 9) if quick else (CANARIES, CANDIDATES)
        secrets = make_canaries(count, candidates, seed)
        texts = list(split.train_x) + [s.text for s, _ in secrets for _ in range(k)]
        labels = list(split.train_y) + [s.label for s, _ in secrets for _ in range(k)]
        config = study.generator_config(method, epsilon, seed, quick)
        tokenizer, model, info = synthetic.train_generator(texts, labels, config, quick=quick,
                                                           noise_generator=torch.Generator().manual_seed(seed + 1),
                                                           sampling_seed=seed)
        exposures, ranks = [], []
        for secret, others in secrets:
            scores = completion_logprobs(model, tokenizer, synthetic.SENTIMENT.prompt(secret.label),
                                         [secret.text] + [c.text for c in others])
            exposures.append(exposure(scores[0], scores[1:]))
            ranks.append(1 + sum(s > scores[0] for s in scores[1:]))
            print(f"  canary {secret.text!r}: rank {ranks[-1]} of {len(scores)}, exposure {exposures[-1]:.2f} bits",
                  flush=True)
        return dict(method=method, target_epsilon=epsilon, epsilon=info["epsilon"], k=k, seed=seed,
                    canaries=[s.text for s, _ in secrets], candidates=candidates, ranks=ranks, exposures=exposures,
                    mean_exposure=sum(exposures) / len(exposures), chance_mean_exposure=chance_mean_exposure(candidates),
                    max_exposure=exposure(float("inf"), [0.0] * candidates), generator=info)
    return folder / "synthetic" / "canary" / f"{run}.json", fn
