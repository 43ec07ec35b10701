"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

m canaries are each put into the training set independently with probability 1/2 (S_i = +1 in,
-1 out), the model is trained ONCE, every canary gets a score (here: how much training lowered
its loss), and the auditor guesses T_i = +1 for the k_in highest scores, T_i = -1 for the k_out
lowest and abstains on the rest. With r = k_in + k_out guesses and W correct ones, if training is
(epsilon, delta)-DP with respect to each canary, then for every v

    P[W >= v] <= f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, p) >= v],  p = e^epsilon / (1 + e^epsilon)

(f alone for delta = 0): the guesses are no better than randomized response with parameter
epsilon. `epsilon_lower_bound` returns the largest epsilon this rejects at the given confidence.

What a result shows, and what it does not:
- epsilon_lower is a LOWER confidence bound: with probability >= confidence (over the coins of
  the run), the true epsilon is at least epsilon_lower. epsilon_lower above the reported epsilon
  (more often than 1 - confidence) means the implementation or the accounting is broken.
- epsilon_lower <= reported epsilon is NOT a proof of privacy. The audit only tries the given
  canaries and score, sees only the final model (not every step), and r guesses can never
  certify more than about ln(r / ln(1 / (1 - confidence))) (4.2 for 200 perfect guesses at 95%).
  For DP-SGD-style training audited on the final model, a large gap to the reported epsilon is
  expected even when everything is correct.
- The bound needs the inclusion coins to be independent fair coins, hidden from the scorer, and
  nothing else in the run (settings, normalisation, other data) to depend on them; `audit`
  arranges this. (k_in, k_out) must be fixed before the scores are seen; `audit` pays for
  several choices with a union bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from . import _validate
from .pipeline.noise import entropy_seeded_generator
from .sampling import PoissonBatchSampler, batch_size_of, micro_batches, replace_examples

_BISECTIONS = 60


def _binomial_log_pmf(r: int, p_log: float, q_log: float) -> np.ndarray:
    """log P[Binomial(r, p) = j] for j = 0..r, from log p and log (1 - p) (exact up to rounding)."""
    j = np.arange(1, r + 1, dtype=np.float64)
    log_choose = np.concatenate(([0.0], np.cumsum(np.log(r - j + 1) - np.log(j))))
    k = np.arange(r + 1, dtype=np.float64)
    return log_choose + k * p_log + (r - k) * q_log


def p_value(correct: int, guesses: int, canaries: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on P[at least `correct` of `guesses` guesses are right] for an (epsilon, delta)-DP
    run with `canaries` canaries: f(v) + 2 m delta max_i (f(v - i) - f(v)) / i (module docstring),
    capped at 1. Binomial terms are summed from log-space probabilities."""
    _check_counts(correct, guesses, canaries)
    _validate.non_negative(epsilon=epsilon)
    _validate.in_unit_interval(delta=delta)
    if correct == 0:
        return 1.0
    # log p and log (1 - p) for p = 1 / (1 + e^-epsilon), without overflow
    p_log = -math.log1p(math.exp(-epsilon))
    log_pmf = _binomial_log_pmf(guesses, p_log, p_log - epsilon)
    top = log_pmf[correct:].max()
    tail = float(math.exp(top) * np.exp(log_pmf[correct:] - top).sum())
    if delta == 0:
        return min(1.0, tail)
    below = np.exp(log_pmf[correct - 1::-1])  # P[Bin = v - i] for i = 1..v
    alpha = float((np.cumsum(below) / np.arange(1, correct + 1)).max())
    return min(1.0, tail + 2 * canaries * delta * alpha)


def epsilon_lower_bound(correct: int, guesses: int, canaries: int, delta: float = 0.0,
                        confidence: float = 0.95) -> float:
    """The largest epsilon such that an (epsilon, delta)-DP run would give `correct` or more right
    guesses out of `guesses` (with `canaries` canaries) with probability < 1 - confidence.

    0 when the guesses are no better than chance. The search bisects on epsilon (60 halvings of a
    doubling bracket) and returns the last value it rejected, so it never rounds up.

    Raises:
        ValueError: counts outside 0 <= correct <= guesses <= canaries, delta outside [0, 1),
            confidence outside (0, 1).
    """
    _check_counts(correct, guesses, canaries)
    _validate.in_unit_interval(delta=delta)
    _validate._number("confidence", confidence)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    significance = 1 - confidence

    def rejected(epsilon: float) -> bool:
        return p_value(correct, guesses, canaries, epsilon, delta) < significance

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        low, high = high, 2 * high
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        low, high = (middle, high) if rejected(middle) else (low, middle)
    return low


def _check_counts(correct: int, guesses: int, canaries: int) -> None:
    for name, value in (("correct", correct), ("guesses", guesses), ("canaries", canaries)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got correct={correct}, guesses={guesses}, "
                         f"canaries={canaries}")


@dataclass(frozen=True)
class AuditResult:
    """Outcome of `audit`: the bound, the counts behind it, and the raw material.

    epsilon_reported is the optimizer's accountant's upper epsilon at `delta` (inf without
    noise; None when the optimizer cannot account or delta is 0). scores (m,) and included (m,)
    are the canaries' scores and inclusion coins; k_in, k_out the guess counts that gave the bound.
    """

    epsilon_lower: float
    epsilon_reported: float | None
    correct: int
    guesses: int
    canaries: int
    k_in: int
    k_out: int
    delta: float
    confidence: float
    scores: Tensor
    included: Tensor


def include_canaries(m: int, generator: torch.Generator) -> Tensor:
    """(m,) bool: each canary in independently with probability 1/2."""
    return torch.rand(m, generator=generator, dtype=torch.float64) < 0.5


def guess(scores: Tensor, k_in: int, k_out: int) -> Tensor:
    """(m,) int8 guesses: +1 (in) for the k_in highest scores, -1 (out) for the k_out lowest, 0 else.
    Ties are broken by position, which the inclusion coins do not influence."""
    m = scores.shape[0]
    if k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise ValueError(f"need k_in, k_out >= 0 and k_in + k_out <= {m} canaries, got k_in={k_in}, k_out={k_out}")
    order = torch.argsort(scores, stable=True)
    guesses = torch.zeros(m, dtype=torch.int8)
    guesses[order[m - k_in:]] = 1
    guesses[order[:k_out]] = -1
    return guesses


def count_correct(guesses: Tensor, included: Tensor) -> tuple[int, int]:
    """(right guesses, guesses made): a guess is right when +1 meets an included canary or -1 an
    excluded one; abstentions (0) count for neither."""
    truth = included.to(torch.int8) * 2 - 1
    return int((guesses == truth).sum()), int((guesses != 0).sum())


def best_bound(scores: Tensor, included: Tensor, choices: Sequence[tuple[int, int]], delta: float = 0.0,
               confidence: float = 0.95) -> tuple[float, int, int, int, int]:
    """The largest epsilon_lower_bound over the (k_in, k_out) `choices`, each at confidence
    1 - (1 - confidence) / len(choices) (a union bound, so the maximum keeps `confidence`).
    Returns (epsilon_lower, correct, guesses, k_in, k_out)."""
    if not choices:
        raise ValueError("give at least one (k_in, k_out) choice")
    level = 1 - (1 - confidence) / len(choices)
    best = None
    for k_in, k_out in choices:
        correct, made = count_correct(guess(scores, k_in, k_out), included)
        candidate = (epsilon_lower_bound(correct, made, scores.shape[0], delta, level), correct, made, k_in, k_out)
        if best is None or candidate[0] > best[0]:
            best = candidate
    return best


LossFn = Callable[[nn.Module, object], Tensor]


def audit(model: nn.Module, optimizer, canaries, loss_fn: LossFn, *, steps: int, data=None,
          choices: Sequence[tuple[int, int]] | None = None, delta: float | None = None,
          confidence: float = 0.95, micro_batch_size: int = 256,
          generator: torch.Generator | None = None) -> AuditResult:
    """Train `model` with `optimizer` once, with each canary included with probability 1/2, and
    bound epsilon from below (module docstring).

    The training set is `data` plus the included canaries; each of the `steps` logical batches
    draws every example of it independently with the optimizer's sampling rate q (Poisson),
    runs `loss_fn` per micro-batch, backpropagates the sum (or mean, per the optimizer's
    loss_reduction) and calls `optimizer.step()`, also for an empty batch. The optimizer's
    expected batch size is a fixed public number, so nothing but the canaries' own gradients
    depends on the coins. A canary's score is its loss before training minus its loss after.

    Canaries are examples in the same format as `data`; the strongest are those whose gradient
    is clipped to the full max_grad_norm and is nearly orthogonal to everything else (e.g. a
    token no other example uses, with a random label).

    Args:
        model: the peft model the optimizer was built on (trained in place).
        optimizer: a prism.PRISM or prism.NaiveDPLoRA built with sample_rate (or dataset_size).
        canaries: a batch of m examples: a tensor, a tuple/list of tensors or a mapping of tensors
            whose dim 0 is the example axis.
        loss_fn: (model, batch) -> (b,) per-example losses.
        steps: number of logical steps.
        data: the other training examples (same format), or None.
        choices: (k_in, k_out) guess counts to try, fixed in advance (default: (m/10, m/10)).
        delta: delta of the bound and of the reported epsilon (default: the optimizer's, else 0).
        confidence: of the lower bound (default: 0.95).
        micro_batch_size: examples per forward/backward pass (a memory knob only).
        generator: the coins and the Poisson draws (default: seeded from the OS entropy source).
    """
    rate = optimizer.plan.sample_rate
    if rate is None:
        raise ValueError("audit needs the optimizer's Poisson rate: build it with sample_rate (or dataset_size).")
    generator = entropy_seeded_generator() if generator is None else generator
    m = batch_size_of(canaries)
    choices = [(m // 10, m // 10)] if choices is None else list(choices)
    delta = (optimizer.plan.delta or 0.0) if delta is None else delta
    before = canary_losses(model, canaries, loss_fn, micro_batch_size)
    included = include_canaries(m, generator)
    inside = replace_examples(canaries, included.nonzero().squeeze(1), batch_size_of(canaries))
    n = 0 if data is None else batch_size_of(data)
    pool = n + int(included.sum())
    batches = PoissonBatchSampler(pool, rate, steps, generator=generator) if pool else ([] for _ in range(steps))
    model.train()
    for indices in batches:
        indices = torch.tensor(indices, dtype=torch.long)
        for source, chosen in ((data, indices[indices < n]), (inside, indices[indices >= n] - n)):
            if len(chosen):
                for micro in micro_batches(replace_examples(source, chosen, batch_size_of(source)), micro_batch_size):
                    losses = loss_fn(model, micro)
                    (losses.sum() if optimizer.loss_reduction == "sum" else losses.mean()).backward()
        optimizer.step()
    scores = before - canary_losses(model, canaries, loss_fn, micro_batch_size)
    lower, correct, made, k_in, k_out = best_bound(scores, included, choices, delta, confidence)
    reported = optimizer.get_epsilon(delta)[2] if optimizer.accountant is not None and delta > 0 else None
    return AuditResult(lower, reported, correct, made, m, k_in, k_out, delta, confidence, scores, included)


@torch.no_grad()
def canary_losses(model: nn.Module, canaries, loss_fn: LossFn, micro_batch_size: int = 256) -> Tensor:
    """(m,) float64 per-example losses of the canaries, in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([loss_fn(model, micro).detach().double().cpu()
                          for micro in micro_batches(canaries, micro_batch_size)])
    finally:
        model.train(was_training)
