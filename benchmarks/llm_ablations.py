"""Ablations of PRISM for the LLM benchmark's diagnosis (not library features).

`PRISMElementwiseAdam`: PRISM with metric="balanced" whose r x r DP-aware preconditioner (method 3.5) is
replaced by Adam's per-coordinate one on the balanced factors,

    m <- b1 m + (1 - b1) D,   v <- b2 v + (1 - b2) D * D,   u = m_hat / (sqrt(v_hat) + eps)   (elementwise),

then lifted horizontally and retracted as usual. With it, PRISM differs from naive DP-LoRA (DP-Adam on
the factors) only by the noise's gauge part (removed), the retraction (no lr^2 dA dB^T term) and the
re-balancing after each step. It is not gauge invariant: coordinates of the balanced factors are
defined only up to the orthogonal gauge, which Procrustes alignment (method 3.6) pins down.
"""

from __future__ import annotations

import contextlib

import torch

import prism
from prism import functional, manifold


def _elementwise_adam(A, B, dA, dB, basis, state, cfg):
    if not state:
        state.update(step=0, exp_avg_A=torch.zeros_like(A), exp_avg_B=torch.zeros_like(B),
                     exp_avg_sq_A=torch.zeros_like(A), exp_avg_sq_B=torch.zeros_like(B))
    state["step"] += 1
    beta1, beta2 = cfg.betas
    directions = []
    for side, direction in (("A", dA), ("B", dB)):
        exp_avg, exp_avg_sq = state[f"exp_avg_{side}"], state[f"exp_avg_sq_{side}"]
        exp_avg.lerp_(direction, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(direction, direction, value=1 - beta2)
        m_hat = exp_avg / (1 - beta1 ** state["step"])
        v_hat = exp_avg_sq / (1 - beta2 ** state["step"])
        directions.append(m_hat / (v_hat.sqrt() + cfg.eps))
    return manifold.horizontal_lift(A, B, *directions)


@contextlib.contextmanager
def _patched():
    original, functional._adaptive_direction = functional._adaptive_direction, _elementwise_adam
    try:
        yield
    finally:
        functional._adaptive_direction = original


class PRISMElementwiseAdam(prism.PRISM):
    """PRISM(metric="balanced") with Adam's per-coordinate preconditioner (see the module docstring)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, metric="balanced", **kwargs)

    def _lora_updates(self, configs):
        with _patched():
            return super()._lora_updates(configs)
