"""DP-aware r x r preconditioning of factor-shaped directions (docs/method.md 3.5).

For one side (A with d = m rows, or B with d = n rows) and a lifted direction D (d, r):

    m <- beta1 m + (1 - beta1) D                  (first moment, (d, r))
    V <- beta2 V + (1 - beta2) D^T D / d          (second moment, (r, r))
    u  = m_hat floor(V_hat)^{-1/2}                m_hat, V_hat bias-corrected

floor() raises eigenvalues to lambda (the noise floor) and to lambda_max / max_condition.

Two-sided (optional, `rows` given): each row i of D (a feature) also gets a second moment rho_i, the
mean square of its entries, and the r x r moment is taken of the row-normalised direction:

    rho_i <- beta2 rho_i + (1 - beta2) ||D_i||^2 / r,        rho' = max(rho_hat, lambda)   (per row)
    D~ = diag(rho')^{-1/2} D,      W <- beta2 W + (1 - beta2) D~^T D~ / d                    (r x r)
    u  = diag(rho')^{-1/2} m_hat floor(W_hat)^{-1/2},    floor of W: lambda mean_i(1 / rho'_i)

a factored stand-in for Adam's per-coordinate moments, v_ij ~ rho_i w_jj: a few rows whose gradients
dwarf the others' (outlier features) no longer set the scale of every row. Under isotropic noise
rho' = std^2, W ~ I and the update is the one-sided one, m_hat / std.

Every operation is a spectral function, a right-multiplication or a function of row norms, so under
an orthogonal gauge (D -> D O, m -> m O, V -> O^T V O, rho unchanged) the output moves as u -> u O.
Each function also takes a stack of modules (leading dimension k: D (k, d, r), V (k, r, r), rho
(k, d), floors (k, 1)).
"""

from __future__ import annotations

import torch
from torch import Tensor


def noise_floors(mode: str, factor: float, std: float, basis, m: int, n: int
                 ) -> tuple[float | Tensor, float | Tensor]:
    """Eigenvalue floors (lambda_A, lambda_B) for the second moments of the A and B sides: numbers
    ("scalar"), or tensors of shape (..., 1) for the basis' leading dimensions ("geometry").

    The injected noise alone gives E[dA^T dA]/m = std^2 (m - r)/m N^{-1} and
    E[dB^T dB]/n = std^2 (n - r)/n M^{-1} (M = A^T A, N = B^T B).

    - "scalar": lambda = factor * std^2 on both sides (the published default, factor 0.5).
    - "geometry": lambda_A = factor std^2 tr(N^{-1})/r (m - r)/m and
      lambda_B = factor std^2 tr(M^{-1})/r (n - r)/n, the mean noise eigenvalue per side.
      (the paper states lambda_B without (n - r)/n; docs/method.md 3.5 says why prism keeps it.)
    """
    base = factor * std ** 2
    if mode == "scalar":
        return base, base
    r = basis.R_A.shape[-1]
    eye = torch.eye(r, dtype=basis.R_A.dtype, device=basis.R_A.device)
    tr_M_inv = torch.linalg.solve_triangular(basis.R_A, eye, upper=True).square().sum((-2, -1)).unsqueeze(-1)
    tr_N_inv = basis.R_B_inv.square().sum((-2, -1)).unsqueeze(-1)
    return base * tr_N_inv / r * (m - r) / m, base * tr_M_inv / r * (n - r) / n


def update_moments(exp_avg: Tensor, exp_avg_sq: Tensor, direction: Tensor, betas: tuple[float, float],
                   rows: Tensor | None = None, floor: float | Tensor = 0.0, step: int = 1) -> None:
    """In place: exp_avg <- b1 exp_avg + (1-b1) D; exp_avg_sq <- b2 exp_avg_sq + (1-b2) D^T D / d, or
    two-sided (rows given): rows <- b2 rows + (1-b2) ||D_i||^2 / r first, and exp_avg_sq takes the
    row-normalised D (see the module docstring; `floor` is lambda, `step` the step count, from 1)."""
    beta1, beta2 = betas
    exp_avg.lerp_(direction, 1 - beta1)
    if rows is not None:
        rows.mul_(beta2).add_(direction.square().mean(-1), alpha=1 - beta2)
        direction = direction / _row_scale(rows, beta2, step, floor).unsqueeze(-1)
    exp_avg_sq.mul_(beta2).add_(direction.mT @ direction, alpha=(1 - beta2) / direction.shape[-2])


def _row_scale(rows: Tensor, beta2: float, step: int, floor: float | Tensor) -> Tensor:
    """sqrt(rho') with rho' = max(rho_hat, floor), rho_hat the bias-corrected row moments."""
    rho = torch.maximum(rows / (1 - beta2 ** step), torch.as_tensor(floor, dtype=rows.dtype, device=rows.device))
    return rho.clamp_min(torch.finfo(rho.dtype).tiny).sqrt()


def preconditioned(exp_avg: Tensor, exp_avg_sq: Tensor, step: int, betas: tuple[float, float],
                   floor: float | Tensor, max_condition: float, eps: float, rows: Tensor | None = None) -> Tensor:
    """u = m_hat P diag(1 / (sqrt(lambda') + eps)) P^T with V_hat = P diag(lambda) P^T and
    lambda' = max(lambda, floor, lambda_max / max_condition); two-sided (rows given): with the row-normalised
    moment, m_hat's rows divided by sqrt(rho') first and the floor lambda mean_i(1 / rho'_i)."""
    beta1, beta2 = betas
    m_hat = exp_avg / (1 - beta1 ** step)
    V_hat = exp_avg_sq / (1 - beta2 ** step)
    if rows is not None:
        scale = _row_scale(rows, beta2, step, floor)
        m_hat = m_hat / scale.unsqueeze(-1)
        floor = (floor / scale.square()).mean(-1, keepdim=True)  # each term <= 1; 0 without a floor (no overflow)
    lam, P = torch.linalg.eigh((V_hat + V_hat.mT) / 2)
    lam = lam.clamp_min(0)
    lam = torch.maximum(lam, (lam.amax(-1, keepdim=True) / max_condition).clamp_min(floor))
    return m_hat @ (P / (lam.sqrt() + eps).unsqueeze(-2)) @ P.mT
