"""Per-example gradient information from what the hooks see, one function per kind of module.

Every function takes the tensors of one forward call of a module on a micro-batch of b
examples, with the token axes flattened: inputs (b, T, in) and output gradients (b, T, out),
and returns a tuple of per-example tensors with leading dimension b. No function forms a
per-example tensor larger than the module's own parameters: for LoRA that is O(b r (m + n)).

This module is the pure-PyTorch reference of the per-sample hot path: the compiled kernels
(kernels.py) must match it. Everything is computed in the compute dtype (fp32 or fp64) of the
tensors given, which `in_compute_dtype` produces from what the hooks captured.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..manifold import TangentBasis


def in_compute_dtype(dtype: torch.dtype, *captured: Tensor, grad_scale: float | Tensor = 1) -> list[Tensor]:
    """The captured tensors (inputs..., output gradient) in `dtype`, the gradient times grad_scale."""
    tensors = [t.to(dtype) for t in captured]
    if isinstance(grad_scale, Tensor) or grad_scale != 1:
        tensors[-1] = tensors[-1] * grad_scale
    return tensors


def tangent_blocks(x: Tensor, h: Tensor, go: Tensor, basis: TangentBasis) -> tuple[Tensor, Tensor]:
    """Tangent-space blocks of each example's gradient G_i = dL_i/dZ (docs/method.md 3.1).

    With xt_t the input of lora_A (x), h_t = B^T xt_t its output and go_t = s g_t the
    gradient at lora_B's output (peft's scaling s included):

        p_t = R_B^{-T} h_t = Q_B^T xt_t,   q_t = Q_A^T go_t,
        Y_i = sum_t go_t p_t^T = G_i Q_B,  W_i = sum_t xt_t q_t^T = G_i^T Q_A.

    P_Z(G_i) is released through manifold.split_tangent(Y_i, W_i) (S_i = Q_A^T Y_i).

    Args:
        x: (b, T, n) lora_A input (after dropout).
        h: (b, T, r) lora_A output.
        go: (b, T, m) gradient of the loss w.r.t. lora_B's output.
        basis: thin QR factors of the current A (m, r) and B (n, r).

    Returns:
        Y (b, m, r), W (b, n, r).
    """
    p = h @ basis.R_B_inv
    q = go @ basis.Q_A
    return go.transpose(1, 2) @ p, x.transpose(1, 2) @ q


def tangent_sqnorms(Y: Tensor, W: Tensor, basis: TangentBasis) -> Tensor:
    """Squared norm of what split_tangent releases for each example, shape (b,):

        ||S||^2 + ||U||^2 + ||V||^2 = ||Y||^2 + ||W||^2 - ||Q_B^T W||^2   (= ||P_Z(G_i)||_F^2),

    exact whatever rounding Y and W carry (e.g. h_t computed in bf16), so the clip bounds the
    released vector itself.
    """
    return (_sqnorms(Y) + _sqnorms(W) - _sqnorms(basis.Q_B.T @ W)).clamp_min(0)


def balanced_sqnorms(Y: Tensor, W: Tensor, basis: TangentBasis) -> Tensor:
    """Squared norm of each example's gradient in the factors when they are balanced, shape (b,):

        ||G_i B||^2 + ||G_i^T A||^2 = ||Y_i R_B||^2 + ||W_i R_A||^2   (A = Q_A R_A, B = Q_B R_B),

    the clip norm of PRISM's "balanced" metric (docs/method.md 3.7). It depends on Z alone when
    the factors are balanced (A^T A = B^T B), which PRISM keeps them.
    """
    return _sqnorms(Y @ basis.R_B) + _sqnorms(W @ basis.R_A)


def lora_factor_grads(x: Tensor, h: Tensor, go: Tensor, lora_B_weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example gradients of peft's factors, as naive DP-LoRA clips them.

    grad lora_B.weight_i = sum_t go_t h_t^T (m, r);
    grad lora_A.weight_i = sum_t u_t xt_t^T (r, n) with u_t = lora_B.weight^T go_t.

    Returns:
        (b, m, r) and (b, r, n).
    """
    u = go @ lora_B_weight
    return go.transpose(1, 2) @ h, u.transpose(1, 2) @ x


def linear_grads(x: Tensor, go: Tensor, has_bias: bool) -> tuple[Tensor, ...]:
    """Per-example gradients of an nn.Linear: weight sum_t go_t x_t^T (b, out, in), bias sum_t go_t."""
    weight = go.transpose(1, 2) @ x
    return (weight, go.sum(1)) if has_bias else (weight,)


def sum_of_squares(*tensors: Tensor) -> Tensor:
    """Per-example squared Euclidean norm over all given (b, ...) tensors, shape (b,)."""
    return sum(_sqnorms(t) for t in tensors)


def _sqnorms(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).square().sum(1)  # also for b = 0
