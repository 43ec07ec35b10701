"""Geometry of the manifold M_r of rank-r matrices, in factored form.

A point is Z = A B^T with A (m, r) and B (n, r) of full column rank. The gauge
(A, B) -> (A R, B R^{-T}) leaves Z unchanged; every function here either depends on Z
only, or is equivariant under orthogonal gauges R = O (A -> A O, B -> B O), as stated
in its docstring. All functions are pure and expect a floating dtype of at least fp32. Every
function also takes a stack of modules of one shape (leading batch dimensions: A (k, m, r), ...)
and treats each module on its own; the optimizer batches the modules of one shape this way.

A tangent vector at Z is stored in block form (S, U, V):

    xi = Q_A S Q_B^T + U Q_B^T + Q_A V^T,   Q_A^T U = 0,  Q_B^T V = 0,
    ||xi||_F^2 = ||S||^2 + ||U||^2 + ||V||^2,

with A = Q_A R_A and B = Q_B R_B thin QR factorisations.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class TangentBasis(NamedTuple):
    """Thin QR factors of A (m, r) and B (n, r), and R_B^{-1} (used to map h_t to p_t)."""

    Q_A: Tensor  # (m, r)
    R_A: Tensor  # (r, r), upper triangular
    Q_B: Tensor  # (n, r)
    R_B: Tensor  # (r, r), upper triangular
    R_B_inv: Tensor  # (r, r)

    def unbind(self) -> list[TangentBasis]:
        """The bases of a stack of modules (leading dimension k), one per module (views)."""
        return [TangentBasis(*parts) for parts in zip(*(t.unbind(0) for t in self))]


def tangent_basis(A: Tensor, B: Tensor) -> TangentBasis:
    """Orthonormal bases of the column spaces of A and B (thin QR)."""
    Q_A, R_A = torch.linalg.qr(A)
    Q_B, R_B = torch.linalg.qr(B)
    eye = torch.eye(R_B.shape[-1], dtype=R_B.dtype, device=R_B.device)
    R_B_inv = torch.linalg.solve_triangular(R_B, eye, upper=True)
    return TangentBasis(Q_A, R_A, Q_B, R_B, R_B_inv)


def split_tangent(Y: Tensor, W: Tensor, basis: TangentBasis) -> tuple[Tensor, Tensor, Tensor]:
    """Blocks (S, U, V) of P_Z(G) from Y = G Q_B (m, r) and W = G^T Q_A (n, r).

    S = Q_A^T Y,  U = (I - P_A) Y,  V = (I - P_B) W  (= W - Q_B S^T exactly).  Linear in (Y, W);
    U and V are orthogonal to Q_A and Q_B whatever rounding Y and W carry.
    """
    S = basis.Q_A.mT @ Y
    U = Y - basis.Q_A @ S
    V = W - basis.Q_B @ (basis.Q_B.mT @ W)
    return S, U, V


def symmetric_lift(S: Tensor, U: Tensor, V: Tensor, basis: TangentBasis) -> tuple[Tensor, Tensor]:
    """A factor pair (dA, dB) with dA B^T + A dB^T = xi (docs/method.md 3.5).

    dA = (U + Q_A S / 2) R_B^{-T},   dB = (V + Q_B S^T / 2) R_A^{-T}.
    """
    dA = torch.linalg.solve_triangular(basis.R_B, (U + basis.Q_A @ S / 2).mT, upper=True).mT
    dB = torch.linalg.solve_triangular(basis.R_A, (V + basis.Q_B @ S.mT / 2).mT, upper=True).mT
    return dA, dB


def solve_sylvester_spd(M: Tensor, N: Tensor, C: Tensor) -> Tensor:
    """Solve M X + X N = C for symmetric positive definite M, N (r, r).

    With M = P diag(a) P^T and N = Q diag(c) Q^T:  X = P [(P^T C Q)_ij / (a_i + c_j)] Q^T.
    """
    a, P = torch.linalg.eigh(M)
    c, Q = torch.linalg.eigh(N)
    return P @ ((P.mT @ C @ Q) / (a[..., :, None] + c[..., None, :])) @ Q.mT


def horizontal_lift(A: Tensor, B: Tensor, dA: Tensor, dB: Tensor) -> tuple[Tensor, Tensor]:
    """The minimum-norm factor pair representing the same dZ = dA B^T + A dB^T.

    Solves M Om + Om N = dB^T B - A^T dA (M = A^T A, N = B^T B) and returns
    (dA + A Om, dB - B Om^T), which satisfies A^T dA' = dB'^T B. It depends on (A, B, dZ)
    only, and is equivariant: (A O, B O, dA O, dB O) -> (dA' O, dB' O).
    """
    Om = solve_sylvester_spd(A.mT @ A, B.mT @ B, dB.mT @ B - A.mT @ dA)
    return dA + A @ Om, dB - B @ Om.mT
