"""Private Evolution (PE) for text, without fine-tuning (Lin et al. 2024; Aug-PE, Xie et al. 2024; PrE-Text,
Hou et al. 2024), with its privacy accounted by prism's accountant.

Per label y (the labels are private too: each example votes only among the synthetic samples of its own
label, and the histogram below covers both labels at once):

    S_0 = n/2 samples per label from the untuned model (RANDOM_API: the zero-shot chat prompt)
    for t = 1..T:
        e(x) = MiniLM sentence embedding (benchmarks.synthetic_metrics.Embedder)
        h[j] = #{ private (x, y) : j = argmin_{j' in S_{t-1}, label(j') = y} ||e(x) - e(j')|| }
        h~ = h + N(0, sigma^2 I)                              (the only access to private data)
        h~ = h~ * [h~ >= H],  H = threshold_sigmas * sigma      (drop bins that are mostly noise)
        draw n/2 samples per label from S_{t-1} with probabilities h~ / sum h~ (uniform if all are 0)
        if t < T: S_t = VARIATION_API(draws)    else: output the draws

VARIATION_API(s): keep the first ceil(f w) of the w words of s, f ~ U[0.3, 0.7], and let the untuned
model continue them under the same zero-shot prompt (the assistant's turn pre-filled with that prefix);
a continuation the sampling filters reject is replaced by s itself.

Privacy: adding or removing one private example changes exactly one count of h by 1, so each histogram
is a Gaussian mechanism of L2 sensitivity 1 and noise multiplier sigma, without subsampling; T of them
compose to T Gaussian mechanisms (equivalently one of multiplier sigma / sqrt(T): mu-GDP with
mu = sqrt(T) / sigma, Dong, Roth & Su 2019). `noise_multiplier` calibrates sigma with prism's PRV
accountant at sampling rate 1 (the same accountant as the fine-tuned generators);
`gdp_epsilon` is the exact closed form the tests check it against:

    delta(eps) = Phi(-eps / mu + mu / 2) - e^eps Phi(-eps / mu - mu / 2).

Everything after the noisy histograms (drawing, variation, the output) is post-processing. The noise is
drawn from a seeded generator so that benchmark runs repeat; a release must draw it from OS entropy.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.stats import norm

import prism
from prism.accounting import epsilon_for


@dataclass(frozen=True)
class Config:
    epsilon: float = 8.0
    delta: float = 1e-5
    iterations: int = 3  # T noisy histograms (T - 1 variation rounds)
    threshold_sigmas: float = 2.0  # H = threshold_sigmas * sigma
    keep: tuple[float, float] = (0.3, 0.7)  # the range of the fraction of words a variation keeps

    def __post_init__(self):
        if not self.epsilon > 0 or not 0 < self.delta < 1:
            raise ValueError(f"need epsilon > 0 and 0 < delta < 1, got epsilon={self.epsilon}, delta={self.delta}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {self.iterations!r}")

    @classmethod
    def quick(cls, epsilon: float) -> "Config":
        return cls(epsilon=epsilon, iterations=2)


def noise_multiplier(epsilon: float, delta: float, iterations: int) -> float:
    """The smallest sigma (to 0.1 %) whose T = iterations Gaussian mechanisms of sensitivity 1 spend at most
    epsilon at delta, by prism's accountant (PRV, upper bound; sampling rate 1 = no subsampling)."""
    return prism.calibrate_noise_multiplier(epsilon, delta, 1.0, steps=iterations)


def epsilon_spent(sigma: float, iterations: int, delta: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) epsilon of T Gaussian mechanisms (sensitivity 1, multiplier sigma), prism's accountant."""
    return epsilon_for(sigma, 1.0, iterations, delta)


def gdp_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of mu-GDP (exact for composed Gaussian mechanisms)."""
    return float(norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2))


def gdp_epsilon(sigma: float, iterations: int, delta: float) -> float:
    """The exact epsilon at delta of T Gaussian mechanisms of sensitivity 1 and multiplier sigma (mu = sqrt(T)/sigma)."""
    mu = math.sqrt(iterations) / sigma
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    high = 1.0
    while gdp_delta(high, mu) > delta:
        high *= 2
    return brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, high, xtol=1e-10)


def votes(private: np.ndarray, private_labels, synthetic: np.ndarray, synthetic_labels) -> np.ndarray:
    """h: for each synthetic sample, how many private examples of its label have it as their nearest
    (L2, ties to the lowest index) synthetic sample of that label. Sums to the number of private examples
    whose label has synthetic samples."""
    private_labels, synthetic_labels = np.asarray(private_labels), np.asarray(synthetic_labels)
    h = np.zeros(len(synthetic), dtype=np.float64)
    for label in np.unique(private_labels):
        pool = np.flatnonzero(synthetic_labels == label)
        if not len(pool):
            continue
        x = private[private_labels == label]
        distance = (x ** 2).sum(1)[:, None] - 2 * x @ synthetic[pool].T + (synthetic[pool] ** 2).sum(1)[None]
        np.add.at(h, pool[distance.argmin(1)], 1.0)
    return h


def noisy_histogram(h: np.ndarray, sigma: float, threshold: float, generator: torch.Generator) -> np.ndarray:
    """h + N(0, sigma^2 I), with the bins below `threshold` set to 0 (the noise from a torch generator, float64)."""
    noisy = h + sigma * torch.randn(len(h), generator=generator, dtype=torch.float64).numpy()
    return np.where(noisy >= threshold, noisy, 0.0)


def draw(weights: np.ndarray, labels, per_label: int, rng: np.random.Generator) -> list[int]:
    """per_label indices of each label, drawn with replacement with probabilities proportional to weights
    (uniform over the label's samples when all its weights are 0)."""
    labels, out = np.asarray(labels), []
    for label in np.unique(labels):
        pool = np.flatnonzero(labels == label)
        w = weights[pool]
        p = w / w.sum() if w.sum() > 0 else np.full(len(pool), 1 / len(pool))
        out += rng.choice(pool, size=per_label, replace=True, p=p).tolist()
    return out


def vary(model, tokenizer, texts: list[str], labels: list[int], instruction: str, sampling, rng: random.Random,
         keep: tuple[float, float] = Config.keep):
    """VARIATION_API: each text's first ceil(f w) words (f ~ U[keep]) continued by the model; rejected -> the text."""
    from prism.examples.synthetic_data import SENTIMENT
    from prism.examples.synthetic_sampling import chat_prompt_ids, clean, generate, rejection

    prefixes = []
    for text in texts:
        words = text.split()
        prefixes.append(" ".join(words[:max(1, math.ceil(rng.uniform(*keep) * len(words)))]))
    prompts = [chat_prompt_ids(tokenizer, instruction.format(label=SENTIMENT.labels[y]), prefix=p)
               for p, y in zip(prefixes, labels)]
    out, kept = [], 0
    for text, prefix, (cont, finished) in zip(texts, prefixes, generate(model, tokenizer, prompts, sampling)):
        child = clean(prefix + cont)
        ok = rejection(child, finished, sampling) is None
        out.append(child if ok else text)
        kept += ok
    return out, kept / max(len(texts), 1)



def run(model, tokenizer, private_texts, private_labels, n: int, config: Config, instruction: str, sampling,
        seed: int = 0, initial: list[dict] | None = None) -> tuple[list[dict], dict]:
    """Private Evolution; returns (n rows {"text", "label"}, n / 2 per label, drawn with replacement; a report).

    `initial`: S_0, n public samples of the untuned model under `instruction` (e.g. the zero-shot generator's,
    which are exactly RANDOM_API's output); by default sampled here.
    """
    from prism.examples.synthetic_data import SENTIMENT
    from prism.examples.synthetic_sampling import chat_prompt_ids, sample_balanced

    from .synthetic_metrics import Embedder

    start = time.time()
    sigma = noise_multiplier(config.epsilon, config.delta, config.iterations)
    threshold = config.threshold_sigmas * sigma
    print(f"  Private Evolution: T = {config.iterations}, sigma = {sigma:.4f}, threshold {threshold:.3f}", flush=True)
    if initial is None:
        initial, _ = sample_balanced(model, tokenizer, None, n, sampling, seed=seed,
                                     prompt_ids=lambda y: chat_prompt_ids(
                                         tokenizer, instruction.format(label=SENTIMENT.labels[y])))
    texts, labels = [r["text"] for r in initial], [r["label"] for r in initial]
    embed = Embedder()
    private = embed(list(private_texts))
    noise, rng, py_rng = torch.Generator().manual_seed(seed + 1), np.random.default_rng(seed), random.Random(seed)
    history = []
    for t in range(1, config.iterations + 1):
        h = votes(private, private_labels, embed(texts), labels)
        noisy = noisy_histogram(h, sigma, threshold, noise)
        chosen = draw(noisy, labels, n // 2, rng)
        step = dict(iteration=t, nonzero_bins=int((noisy > 0).sum()), distinct_drawn=len(set(chosen)),
                    top_votes=float(h.max()))
        texts, labels = [texts[i] for i in chosen], [labels[i] for i in chosen]
        if t < config.iterations:
            torch.manual_seed(seed + t)
            texts, step["variations_kept"] = vary(model, tokenizer, texts, labels, instruction, sampling, py_rng,
                                                  config.keep)
        history.append(step)
        print(f"  PE iteration {t}/{config.iterations}: {step} ({(time.time() - start) / 60:.1f} min)", flush=True)
    lower, estimate, upper = epsilon_spent(sigma, config.iterations, config.delta)
    report = dict(config=asdict(config), noise_multiplier=sigma, threshold=threshold, epsilon=upper,
                  epsilon_estimate=estimate, epsilon_lower=lower,
                  epsilon_exact_gdp=gdp_epsilon(sigma, config.iterations, config.delta), history=history,
                  private_examples=len(private_texts), sampling_settings=asdict(sampling), seed=seed,
                  seconds=round(time.time() - start, 1))
    return [dict(text=x, label=y) for x, y in zip(texts, labels)], report
