"""Global per-example clipping.

Formal guarantees: with alpha_i = clip_factors(s, C), every example's clipped contribution
alpha_i g_i has norm min(||g_i||, C) <= C, where s_i = ||g_i||^2 is the squared norm over
ALL privately trained tensors (all LoRA modules and dense parameters). So adding or removing
one example changes the clipped sum by at most C (add/remove sensitivity C). With the
optimizers' dense_max_grad_norm the dense parts enter s_i weighted by (C / C_D)^2: the bound
then holds in those weighted coordinates, in which the noise is isotropic.

Edge cases of clip_factors:

    | s_i           | alpha_i        | why                                             |
    |---------------|----------------|-------------------------------------------------|
    | 0             | 1              | nothing to clip; no division by zero            |
    | 0 < s_i <= C^2 | 1              | inside the ball                                 |
    | s_i > C^2     | C / sqrt(s_i)  | scaled onto the sphere of radius C              |
    | inf or NaN    | 0              | example dropped (counted by the caller); its    |
    |               |                | tensors must be zeroed, as NaN * 0 = NaN        |
    | b = 0         | empty          | an empty micro-batch contributes nothing        |
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .units import StepStats, Unit


def clip_factors(sqnorms: Tensor, max_norm: float) -> tuple[Tensor, Tensor]:
    """Clip factors alpha_i = min(1, C / ||g_i||) and the mask of finite norms.

    Args:
        sqnorms: (b,) squared global per-example norms.
        max_norm: the clipping bound C > 0.

    Returns:
        alpha (b,) and finite (b,) bool; alpha is 0 where the norm is not finite.
    """
    finite = torch.isfinite(sqnorms)
    norms = torch.where(finite, sqnorms, 0).clamp_min(0).sqrt()
    alpha = (max_norm / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp(max=1.0)
    return torch.where(finite, alpha, 0), finite


def clipped_sum(alpha: Tensor, finite: Tensor, per_example: Tensor) -> Tensor:
    """sum_i alpha_i t_i over the leading axis, with non-finite examples contributing exactly 0."""
    if not bool(finite.all()):
        keep = finite.reshape(-1, *([1] * (per_example.dim() - 1)))
        per_example = torch.where(keep, per_example, 0)
    return torch.tensordot(alpha.to(per_example.dtype), per_example, dims=1)


@torch.no_grad()
def clip_backward_pass(units: Sequence[Unit], task: int, max_grad_norm: float, stats: StepStats) -> None:
    """The clip stage, run once at the end of every backward pass (one micro-batch).

    Each example's squared norm is summed over every unit that saw backward pass `task`, the
    examples are clipped to the global bound C, and sum_i alpha_i t_i is added to each unit's
    clipped sums; the per-example tensors are dropped, so memory is bounded by one micro-batch.

    Raises:
        RuntimeError: a trained parameter got a gradient in this pass that no hook saw, or the
            units saw different batch sizes (their rows would not be the same examples).
    """
    active = [u for u in units if u.pending is not None and u.pending_key[0] == task]
    unseen = [u.name for u in units if u.gradient_task == task and u not in active]
    if unseen:
        raise RuntimeError(
            f"{', '.join(unseen)}: the parameters got a gradient in this backward pass that prism's per-example "
            "hooks never saw: the model used the module's weights outside its forward call (e.g. F.linear(h, "
            "module.weight)). That gradient cannot be clipped per example: leave the module out of "
            "target_modules / modules_to_save.")
    if not active:
        return
    sizes = {u.pending[0].shape[0] for u in active}
    if len(sizes) != 1:
        raise RuntimeError(f"hooked modules saw different batch sizes {sorted(sizes)} in one backward pass; "
                           "prism needs the batch on dimension 0 of every LoRA and head input.")
    sqnorms = sum(u.pending_norms() for u in active)
    alpha, finite = clip_factors(sqnorms, max_grad_norm)
    for u in active:
        u.flush(alpha, finite)
    stats.examples += sizes.pop()
    stats.count(alpha, finite)
    stats.backward_passes += 1
    stats.last_norms = sqnorms.sqrt()
