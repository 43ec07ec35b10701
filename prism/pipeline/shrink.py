"""DP-aware shrinkage of the first moment (docs/method.md 3.5, PRISM(momentum_shrinkage=True)).

Every step's privatised direction is signal plus noise that is isotropic, with a closed-form energy
E = std^2 r (m + n - r) (noise.noise_energy), in one metric: the tangent space's Frobenius norm of the
direction in Z (metric "frobenius"), or the factors' norm (metric "balanced"). The noise draws are independent
across steps, so the noise part of the bias-corrected first moment mom_hat = (1 - b1) sum_k b1^(t-k) D_k / (1 - b1^t)
has energy c_t E in that metric, with

    c_t = (1 - b1) (1 + b1^t) / ((1 + b1) (1 - b1^t))          (c_1 = 1, c_inf = (1 - b1) / (1 + b1)).

The positive-part James-Stein factor

    s = max(0, 1 - c_t E / ||mom_hat||^2)

is the share of the moment's energy that is not noise. Multiplying the module's step by s keeps it whole while
the gradients stand out of the noise and shrinks it towards 0 once they no longer do (late in training, when
most examples' gradients are small and each step would otherwise be a random walk of constant size). s is a
function of the privatised directions and public constants only (post-processing, no privacy cost), and of
norms that do not depend on how Z is factored (gauge invariant).
"""

from __future__ import annotations

import torch
from torch import Tensor


def moment_energy(metric: str, exp_avg_A: Tensor, exp_avg_B: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """||mom||^2 (one value per module of a stack) in the metric the noise is isotropic in: "frobenius", the
    tangent vector mom_A B^T + A mom_B^T it represents, ||.||_F^2 = tr(mA^T mA N) + 2 tr(mA^T A mB^T B) +
    tr(mB^T mB M) (M = A^T A, N = B^T B: r x r products only); "balanced", ||mom_A||^2 + ||mom_B||^2."""
    if metric == "balanced":
        return exp_avg_A.square().sum((-2, -1)) + exp_avg_B.square().sum((-2, -1))
    M, N = A.mT @ A, B.mT @ B

    def trace(X):
        return X.diagonal(dim1=-2, dim2=-1).sum(-1)

    return (trace(exp_avg_A.mT @ exp_avg_A @ N) + 2 * trace((exp_avg_A.mT @ A) @ (exp_avg_B.mT @ B))
            + trace(exp_avg_B.mT @ exp_avg_B @ M))


def noise_share(beta1: float, step: int) -> float:
    """c_t: the energy of the bias-corrected first moment's noise part, per unit of one step's noise energy."""
    return (1 - beta1) * (1 + beta1 ** step) / ((1 + beta1) * (1 - beta1 ** step))


def shrinkage(energy: Tensor, noise_energy: float, beta1: float, step: int) -> Tensor:
    """s in [0, 1] per module: max(0, 1 - c_t E / ||mom_hat||^2), with `energy` = ||mom||^2 before the bias
    correction (moment_energy) and E = `noise_energy`, one step's."""
    corrected = energy / (1 - beta1 ** step) ** 2
    noise = noise_share(beta1, step) * noise_energy
    return (1 - noise / corrected.clamp_min(torch.finfo(corrected.dtype).tiny)).clamp(0.0, 1.0)
