"""Per-module buffers of the pipeline and the step's counters.

A `Unit` is one trained module's place in the pipeline: the per-example tensors of the backward
pass in progress (`pending`, written by the collect stage) and, after the clip stage, the clipped
sums of the logical step (`sums`, read by the optimizer's step). `StepStats` counts what the
current logical step has seen (not private: for monitoring only).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

from .. import kernels

PerExampleFn = Callable[..., tuple[tuple[Tensor, ...], Tensor | None]]


class Unit:
    """Per-example tensors of one module: pending for this backward pass, then clipped sums.

    Args:
        name: the module's name, for error messages.
        params: the parameters this unit trains.
        per_example: (*captured inputs, output grad, grad_scale=s), each (b, T, features) in
            the model's dtype, s a number or 0-d tensor -> ((b, ...) per-example tensors of the
            gradient of s * loss in the compute dtype, their (b,) squared norms or None).
        sqnorms: per-example tensors -> (b,) squared norms of the gradient they represent (used
            when per_example gives none, or when a module called twice has summed its calls).
        compute_dtype: dtype of all per-example math (fp32, or fp64 for fp64 parameters).
        clip_scale: k, the unit's scale in the joint clip and the noise: its squared norms enter the
            clip divided by k^2, and its noise std is k sigma C / b (1 for LoRA modules, FFA-LoRA's
            lora_B included; C_D / C for dense layers: the optimizers' dense_max_grad_norm).
        sum_shapes: shapes of the clipped sums (default: the parameters' shapes).
    """

    def __init__(self, name: str, params: Sequence[Tensor], per_example: PerExampleFn,
                 sqnorms: Callable[..., Tensor], compute_dtype: torch.dtype, clip_scale: float = 1.0,
                 sum_shapes: Sequence[tuple[int, ...]] | None = None):
        self.name = name
        self.params = list(params)
        self.sum_shapes = [tuple(p.shape) for p in self.params] if sum_shapes is None else list(sum_shapes)
        self.per_example = per_example
        self.sqnorms = sqnorms
        self.compute_dtype = compute_dtype
        self.clip_scale = clip_scale
        self.pending: list[Tensor] | None = None
        self.pending_sqnorms: Tensor | None = None
        self.pending_key: tuple[int, int] | None = None  # (autograd graph task, forward pass)
        self.sums: list[Tensor] | None = None
        self.gradient_arrived = False  # a non-private .grad landed (and was dropped) since the last reset
        self.gradient_task: int | None = None  # the backward pass (graph task) it last landed in

    def add_pending(self, tensors: tuple[Tensor, ...], sqnorms: Tensor | None, key: tuple[int, int]) -> None:
        """Add one forward call's per-example tensors and their squared norms if known (a module
        called twice in one forward pass sums its calls); `key` = (backward graph task, forward
        pass) they come from."""
        if self.pending is not None and self.pending_key[0] != key[0]:
            warnings.warn(f"{self.name}: discarding per-example gradients of a backward pass that did not finish",
                          RuntimeWarning, stacklevel=2)
            self.pending = None
        if self.pending is not None and self.pending_key[1] != key[1]:
            raise RuntimeError("one backward pass went through two forward passes; prism would merge their examples "
                               "by position. Call backward once per forward pass (accumulate over micro-batches).")
        self.pending_key = key
        if self.pending is None:
            self.pending, self.pending_sqnorms = list(tensors), sqnorms
        elif self.pending[0].shape[0] != tensors[0].shape[0]:
            raise RuntimeError(f"{self.name} was called on micro-batches of different sizes within one "
                               "backward pass; prism needs the batch on dimension 0 of every call.")
        else:
            self.pending, self.pending_sqnorms = [p + t for p, t in zip(self.pending, tensors)], None

    def pending_norms(self) -> Tensor:
        """(b,) squared norms of the pending per-example gradients, divided by clip_scale^2."""
        sqnorms = self.pending_sqnorms if self.pending_sqnorms is not None else self.sqnorms(*self.pending)
        return sqnorms if self.clip_scale == 1.0 else sqnorms / self.clip_scale ** 2

    def flush(self, alpha: Tensor, finite: Tensor) -> None:
        """sums += sum_i alpha_i pending_i; drop the per-example tensors."""
        clipped = [kernels.clipped_sum(alpha, finite, t) for t in self.pending]
        self.sums = clipped if self.sums is None else [s + c for s, c in zip(self.sums, clipped)]
        self.pending = self.pending_sqnorms = None

    def sums_or_zeros(self) -> list[Tensor]:
        """The clipped sums, or zeros of their shapes if no example reached this unit."""
        if self.sums is not None:
            return self.sums
        device = self.params[0].device
        return [torch.zeros(shape, dtype=self.compute_dtype, device=device) for shape in self.sum_shapes]

    def reset(self) -> None:
        self.pending = self.pending_sqnorms = None
        self.pending_key = None
        self.sums = None
        self.gradient_arrived = False
        self.gradient_task = None


class StepStats:
    """Counters of the current logical step, computed from the private batch without noise: for
    monitoring and guards only, never to be logged or published."""

    def __init__(self):
        self.examples = 0  # examples clipped (that reached a trained module in a backward pass)
        self.forwarded = 0  # examples in forward passes of the model with gradients enabled
        self.backward_passes = 0
        self.last_norms: Tensor | None = None  # the last backward pass's per-example norms, as clipped (weighted)
        self._flag_counts: Tensor | None = None  # [clipped, non-finite], on the device: counted without a host sync

    def count(self, alpha: Tensor, finite: Tensor) -> None:
        """Add one backward pass's clipped (alpha < 1) and non-finite examples."""
        counts = torch.stack([(alpha < 1).sum(), (~finite).sum()])
        self._flag_counts = counts if self._flag_counts is None else self._flag_counts + counts

    def set_flag_counts(self, clipped: int, nonfinite: int) -> None:
        self._flag_counts = torch.tensor([clipped, nonfinite])

    @property
    def clipped(self) -> int:
        return 0 if self._flag_counts is None else int(self._flag_counts[0])

    @property
    def nonfinite(self) -> int:
        return 0 if self._flag_counts is None else int(self._flag_counts[1])

    def __repr__(self) -> str:
        return (f"StepStats(examples={self.examples}, clipped={self.clipped}, nonfinite={self.nonfinite}, "
                f"backward_passes={self.backward_passes})")
