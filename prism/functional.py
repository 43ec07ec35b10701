"""One optimizer step for one LoRA module, or a stack of modules of one shape, as pure functions
of tensors (docs/method.md section 3).

    clipped sums (Y, W) --split--> (S, U, V) / b + tangent noise      = xi_dp   (3.2, 3.3)
    xi_dp --symmetric lift--> --horizontal lift--> (dA, dB)                     (3.5)
      or, metric "balanced": (Y R_B, W R_A) / b + horizontal noise = (dA, dB)   (3.7)
    adaptive: moments, DP-aware floor, r x r (and row) preconditioner,
              optional momentum shrinkage, lift                                (3.5)
    (A, B) --retract(lr)--> balanced rank-r factors --Procrustes--> (A+, B+)   (3.6)

and the Euclidean (Adam or SGD) step shared by dense parameters and naive DP-LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import manifold
from .pipeline import noise, precondition, retract, shrink


@dataclass(frozen=True)
class StepConfig:
    """Hyperparameters of one step, shared by every module of a parameter group."""

    lr: float
    noise_std: float
    expected_batch_size: float
    adaptive: bool
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    floor_mode: str = "scalar"
    metric: str = "frobenius"
    preconditioner: str = "two_sided"
    floor_factor: float = 0.0
    max_condition: float = 1e4
    momentum_shrinkage: bool = False


def privatize_tangent(Y_sum: Tensor, W_sum: Tensor, basis: manifold.TangentBasis, cfg: StepConfig,
                      generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """xi_dp = (sum_i alpha_i P_Z(G_i)) / b + std P_Z(Xi), in blocks (S, U, V).

    b is the EXPECTED batch size, never the realised one.
    """
    S, U, V = (t / cfg.expected_batch_size for t in manifold.split_tangent(Y_sum, W_sum, basis))
    if cfg.noise_std > 0:
        nS, nU, nV = noise.tangent_noise(basis, cfg.noise_std, generator)
        S, U, V = S + nS, U + nU, V + nV
    return S, U, V


def privatize_factors(A: Tensor, B: Tensor, Y_sum: Tensor, W_sum: Tensor, basis: manifold.TangentBasis,
                      cfg: StepConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The "balanced" metric's privatised direction in the (balanced) factors (docs/method.md 3.7):

        (dA, dB) = (sum_i alpha_i G_i B, sum_i alpha_i G_i^T A) / b + horizontal noise of std,

    with sum_i alpha_i G_i B = Y_sum R_B and sum_i alpha_i G_i^T A = W_sum R_A. Factor gradients
    are horizontal (A^T G B = (G^T A)^T B), so the whole direction is.
    """
    dA = Y_sum @ basis.R_B / cfg.expected_batch_size
    dB = W_sum @ basis.R_A / cfg.expected_batch_size
    if cfg.noise_std > 0:
        nA, nB = noise.horizontal_noise(A, B, cfg.noise_std, generator)
        dA, dB = dA + nA, dB + nB
    return dA, dB


def prism_module_step(A: Tensor, B: Tensor, Y_sum: Tensor, W_sum: Tensor, basis: manifold.TangentBasis,
                      state: dict, cfg: StepConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """New factors (A+, B+) of one LoRA module, or of a stack of k modules of one shape (every
    tensor below with a leading dimension k, and independent noise for each module).

    Args:
        A: (m, r) = lora_B.weight, B: (n, r) = lora_A.weight^T, in the compute dtype.
        Y_sum: (m, r) and W_sum: (n, r): clipped sums of G_i Q_B and G_i^T Q_A (clipped in the norm
            of cfg.metric).
        basis: tangent_basis(A, B), the one the per-example blocks were computed in.
        state: the optimizer state; with cfg.adaptive, holds "step" (int),
            "exp_avg_A" (m, r), "exp_avg_sq_A" (r, r), "exp_avg_B" (n, r), "exp_avg_sq_B" (r, r), and with
            cfg.preconditioner == "two_sided" the row moments "exp_avg_sq_rows_A" (m,), "exp_avg_sq_rows_B" (n,);
            updated in place.
    """
    if cfg.metric == "balanced":
        dA, dB = privatize_factors(A, B, Y_sum, W_sum, basis, cfg, generator)
    else:
        S, U, V = privatize_tangent(Y_sum, W_sum, basis, cfg, generator)
        dA, dB = manifold.horizontal_lift(A, B, *manifold.symmetric_lift(S, U, V, basis))
    if cfg.adaptive:
        dA, dB = _adaptive_direction(A, B, dA, dB, basis, state, cfg)
    if not bool(torch.isfinite(dA).all() and torch.isfinite(dB).all()):
        raise FloatingPointError("the privatised direction is not finite")
    A_new, B_new = retract.retract(A, B, dA, dB, cfg.lr, cfg.weight_decay)
    return retract.procrustes_align(A_new, B_new, A, B)


def _adaptive_direction(A, B, dA, dB, basis, state, cfg: StepConfig) -> tuple[Tensor, Tensor]:
    if not state:
        square = (*A.shape[:-2], A.shape[-1], A.shape[-1])
        state.update(step=0, exp_avg_A=torch.zeros_like(A), exp_avg_B=torch.zeros_like(B),
                     exp_avg_sq_A=A.new_zeros(square), exp_avg_sq_B=A.new_zeros(square))
    two_sided = cfg.preconditioner == "two_sided"
    if two_sided and "exp_avg_sq_rows_A" not in state:  # new, or resumed from a one-sided run
        state.update(exp_avg_sq_rows_A=A.new_zeros(A.shape[:-1]), exp_avg_sq_rows_B=B.new_zeros(B.shape[:-1]))
    state["step"] += 1
    floor_A, floor_B = precondition.noise_floors(cfg.floor_mode, cfg.floor_factor, cfg.noise_std, basis,
                                                 A.shape[-2], B.shape[-2])
    directions = []
    for side, direction, floor in (("A", dA, floor_A), ("B", dB, floor_B)):
        exp_avg, exp_avg_sq = state[f"exp_avg_{side}"], state[f"exp_avg_sq_{side}"]
        rows = state[f"exp_avg_sq_rows_{side}"] if two_sided else None
        precondition.update_moments(exp_avg, exp_avg_sq, direction, cfg.betas, rows, floor, state["step"])
        directions.append(precondition.preconditioned(exp_avg, exp_avg_sq, state["step"], cfg.betas, floor,
                                                      cfg.max_condition, cfg.eps, rows))
    if cfg.momentum_shrinkage:
        energy = shrink.moment_energy(cfg.metric, state["exp_avg_A"], state["exp_avg_B"], A, B)
        noise_energy = noise.noise_energy(cfg.noise_std, A.shape[-2], B.shape[-2], A.shape[-1])
        state["momentum_shrinkage"] = shrink.shrinkage(energy, noise_energy, cfg.betas[0], state["step"])
        directions = [d * state["momentum_shrinkage"][..., None, None] for d in directions]
    return manifold.horizontal_lift(A, B, *directions)


def dense_step(param: Tensor, grad: Tensor, state: dict, cfg: StepConfig) -> Tensor:
    """Euclidean update of one privatised gradient: AdamW if cfg.adaptive, else SGD.

    With decoupled weight decay: p <- p (1 - lr wd) - lr m_hat / (sqrt(max(v_hat, lambda)) + eps),
    where lambda = floor_factor * std^2 is the DP-aware floor (0 gives plain AdamW): coordinates
    whose second moment is no larger than the injected noise's do not take full-size steps.
    `param` and `grad` are in the compute dtype; the state ("step", "exp_avg", "exp_avg_sq")
    is created lazily and updated in place. Returns the new parameter value.
    """
    new = param * (1 - cfg.lr * cfg.weight_decay)
    if not cfg.adaptive:
        return new - cfg.lr * grad
    if "step" not in state:  # the state may already hold the parameter's master or whole value
        state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
    state["step"] += 1
    beta1, beta2 = cfg.betas
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
    v_hat = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).clamp_min(cfg.floor_factor * cfg.noise_std ** 2)
    return new - cfg.lr * m_hat / (v_hat.sqrt() + cfg.eps)
