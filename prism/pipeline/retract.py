"""Retraction: back onto the rank-r manifold after a step, in balanced factors (docs/method.md 3.6).

    (A, B), direction (dA, dB), lr --retract--> balanced factors of the best rank-r approximation
    of Z - lr (dA B^T + A dB^T) --procrustes_align--> rotated as close as possible to (A, B)

All functions accept stacks (leading dimensions) of modules and run in the factors' dtype (fp32
or fp64). Pure functions of tensors; the optimizer state is not touched.
"""

from __future__ import annotations

import torch
from torch import Tensor


def retract(A: Tensor, B: Tensor, dA: Tensor, dB: Tensor, lr: float, weight_decay: float = 0.0
            ) -> tuple[Tensor, Tensor]:
    """Balanced factors of the best rank-r approximation of

        Z+ = (1 - lr * weight_decay) Z - lr (dA B^T + A dB^T)
           = [A, dA] [[(1 - lr wd) I, -lr I], [-lr I, 0]] [B, dB]^T.

    Thin QR of [A, dA] (m, 2r) and [B, dB] (n, 2r), SVD of the small core, keep the top r
    singular triplets: A+ = Q_u U_r S_r^{1/2}, B+ = Q_v V_r S_r^{1/2}. The lr^2 dA dB^T
    term is absent by construction. Depends on Z+ only, up to an orthogonal gauge.
    """
    r = A.shape[-1]
    eye = torch.eye(r, dtype=A.dtype, device=A.device)
    K = torch.cat([torch.cat([(1.0 - lr * weight_decay) * eye, -lr * eye], 1),
                   torch.cat([-lr * eye, torch.zeros_like(eye)], 1)], 0)
    Q_u, R_u = torch.linalg.qr(torch.cat([A, dA], -1))
    Q_v, R_v = torch.linalg.qr(torch.cat([B, dB], -1))
    U, S, Vh = torch.linalg.svd(R_u @ K @ R_v.mT)
    root = _rank_r_sqrt(S[..., :r])
    return Q_u @ U[..., :r] * root, Q_v @ Vh[..., :r, :].mT * root


def balance(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Balanced factors (A'^T A' = B'^T B' = Sigma) of Z = A B^T, via Z's thin SVD.

    Depends on Z only, up to the sign of each singular pair (an orthogonal gauge).
    """
    Q_A, R_A = torch.linalg.qr(A)
    Q_B, R_B = torch.linalg.qr(B)
    U, S, Vh = torch.linalg.svd(R_A @ R_B.mT)
    root = _rank_r_sqrt(S)
    return Q_A @ U * root, Q_B @ Vh.mT * root


def procrustes_align(A: Tensor, B: Tensor, A_ref: Tensor, B_ref: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate (A O, B O) with the orthogonal O minimising ||A O - A_ref||^2 + ||B O - B_ref||^2.

    O = P Q^T from the SVD A^T A_ref + B^T B_ref = P Sigma Q^T. Z is unchanged, balance is
    kept, and factor-shaped optimizer state stays aligned with the factors.
    """
    P, _, Qh = torch.linalg.svd(A.mT @ A_ref + B.mT @ B_ref)
    O = P @ Qh
    return A @ O, B @ O


def _rank_r_sqrt(S: Tensor) -> Tensor:
    """sqrt of singular values (..., r), floored at 1e-7 of the largest so the factors stay full
    rank; shaped (..., 1, r) to scale the columns of a factor."""
    floor = S.amax(-1, keepdim=True).clamp_min(torch.finfo(S.dtype).tiny) * 1e-7
    return torch.maximum(S, floor).sqrt().unsqueeze(-2)
