"""Ablations of PRISM for the LLM benchmark's diagnosis (not library features).

`PRISMElementwiseAdam`: PRISM with metric="balanced" whose r x r DP-aware preconditioner (method 3.5) is
replaced by Adam's per-coordinate one on the balanced factors,

    m <- b1 m + (1 - b1) D,   v <- b2 v + (1 - b2) D * D,   u = m_hat / (sqrt(v_hat) + eps)   (elementwise),

then lifted horizontally and retracted as usual. With it, PRISM differs from naive DP-LoRA (DP-Adam on
the factors) only by the noise's gauge part (removed), the retraction (no lr^2 dA dB^T term) and the
re-balancing after each step. It is not gauge invariant: coordinates of the balanced factors are
defined only up to the orthogonal gauge, which Procrustes alignment (method 3.6) pins down.

`PRISMFactorStep`: PRISMElementwiseAdam whose Adam direction is applied to the factors as they are,

    (A+, B+) = (A - lr u_A, B - lr u_B),

without the horizontal lift, the retraction to rank r (so the lr^2 u_A u_B^T term is back) and the
re-balancing. It differs from naive DP-LoRA only in the noise: PRISM's lacks the vertical (gauge) part,
which moves the factors but not Z to first order. With PRISM(metric="balanced") before them, the two
ablations split PRISM's step from naive DP-Adam's one difference at a time.
"""

from __future__ import annotations

import contextlib
import types

import torch

import prism
from prism import functional, manifold


def _elementwise_adam(A, B, dA, dB, basis, state, cfg, lift=True):
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
    return manifold.horizontal_lift(A, B, *directions) if lift else tuple(directions)


def _factor_step(A, B, dA, dB, lr, weight_decay=0.0):
    return A * (1 - lr * weight_decay) - lr * dA, B * (1 - lr * weight_decay) - lr * dB


_ADDITIVE = types.SimpleNamespace(retract=_factor_step, procrustes_align=lambda A, B, A_ref, B_ref: (A, B))


@contextlib.contextmanager
def _patched(factor_step: bool = False):
    saved = functional._adaptive_direction, functional.retract
    functional._adaptive_direction = (lambda *args: _elementwise_adam(*args, lift=False)) if factor_step \
        else _elementwise_adam
    if factor_step:
        functional.retract = _ADDITIVE
    try:
        yield
    finally:
        functional._adaptive_direction, functional.retract = saved


class PRISMElementwiseAdam(prism.PRISM):
    """PRISM(metric="balanced") with Adam's per-coordinate preconditioner (see the module docstring)."""

    _factor_step = False

    def __init__(self, model, metric: str = "balanced", **kwargs):
        if metric != "balanced":
            raise ValueError(f"metric={metric!r}: the Adam ablation works in the balanced factors; use 'balanced'")
        super().__init__(model, metric=metric, **kwargs)

    def _lora_updates(self, configs):
        with _patched(self._factor_step):
            return super()._lora_updates(configs)


class PRISMFactorStep(PRISMElementwiseAdam):
    """PRISMElementwiseAdam applied to the factors additively (see the module docstring)."""

    _factor_step = True
