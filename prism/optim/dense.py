"""Euclidean private training of whole tensors: dense layers (a head) and naive DP-LoRA's factors.

Each parameter gets (clipped sum) / b + N(0, (k sigma C / b)^2 I), k = the unit's clip_scale, and
an AdamW (with the DP-aware floor) or SGD step (functional.dense_step), in its group's settings.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..functional import StepConfig, dense_step
from ..layers import DenseLinear
from ..pipeline import per_example
from ..pipeline.noise import gaussian
from ..pipeline.units import Unit
from .updates import Update, compute_dtype, value_of


def dense_unit(layer: DenseLinear, *, clip_scale: float) -> Unit:
    """The pipeline unit of a dense nn.Linear: per-example weight (and bias) gradients.

    Raises:
        ValueError: the bias is trained but the weight is frozen.
    """
    module = layer.module
    params = [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]
    if len(params) == 1 and params[0] is not module.weight:
        raise ValueError(f"{layer.name}: a dense nn.Linear with a trainable bias but a frozen weight is not "
                         "supported; train both or neither.")
    has_bias = len(params) == 2
    dtype = compute_dtype(module.weight)

    def grads(x, go, grad_scale):
        return per_example.linear_grads(*per_example.in_compute_dtype(dtype, x, go, grad_scale=grad_scale),
                                        has_bias), None

    return Unit(layer.name, params, grads, per_example.sum_of_squares, dtype, clip_scale=clip_scale)


def euclidean_updates(unit: Unit, configs: dict[int, StepConfig], state: dict,
                      generator: torch.Generator) -> list[Update]:
    """New values of the unit's parameters: noise, then DP-AdamW / DP-SGD; `configs` maps id(param)
    to its group's StepConfig, `state` is the optimizer's per-parameter state."""
    updates = []
    for param, grad_sum in zip(unit.params, unit.sums_or_zeros()):
        cfg = configs[id(param)]
        if unit.clip_scale != 1.0:
            cfg = replace(cfg, noise_std=unit.clip_scale * cfg.noise_std)
        value = value_of(param, state[param] if param in state else {}, unit.compute_dtype)
        grad = grad_sum / cfg.expected_batch_size
        if cfg.noise_std > 0:
            grad = grad + gaussian(tuple(value.shape), cfg.noise_std, generator, value)
        updates.append(Update(param, dense_step(value, grad, state[param], cfg), unit.name))
    return updates
