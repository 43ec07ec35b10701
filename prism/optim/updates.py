"""The last stage of a step: new parameter values written, all or none, with fp32 masters.

Parameters stored in bf16/fp16 keep an fp32 master copy in the optimizer state, so updates
smaller than the low-precision rounding step still accumulate across steps. Sharded parameters
(DTensors, FSDP2) keep their whole value in the compute dtype instead (prism.sharding): it is
what the step reads, and only this rank's part of each new value is written into the parameter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import distributed, sharding

LOW_PRECISION = (torch.bfloat16, torch.float16)
MASTER = "fp32_master"
WHOLE = "whole_value"  # sharded parameters: the whole value in the compute dtype, the same on every rank


def compute_dtype(param: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 parameters, fp64 for fp64 ones."""
    return torch.promote_types(param.dtype, torch.float32)


class Update(NamedTuple):
    """A parameter's new value (in the compute dtype) and its module's name."""

    param: Tensor
    value: Tensor
    module_name: str


def value_of(param: Tensor, state: dict, dtype: torch.dtype) -> Tensor:
    """The parameter's current value in `dtype`: its fp32 master copy (in `state`, the parameter's
    optimizer state) for bf16/fp16 parameters, else the parameter itself.

    A master copy that no longer rounds to the parameter (someone wrote to the parameter,
    e.g. loaded other weights) is dropped and the parameter's value is used. A sharded parameter's
    value is its whole value kept in `state` (prism.sharding).
    """
    if sharding.is_sharded(param):
        if WHOLE not in state:
            raise RuntimeError("a sharded parameter has no whole value in the optimizer state; build the optimizer "
                               "after fully_shard, on every rank.")
        return state[WHOLE].to(dtype)
    master = state.get(MASTER)
    if master is not None and not torch.equal(master.to(param.dtype), param.detach()):
        del state[MASTER]
        master = None
    return (param.detach() if master is None else master).to(dtype)


def keep_whole_values(params, state: dict) -> None:
    """Gather the whole value of every sharded parameter into its state (a collective: every rank calls
    it with the same parameters in the same order)."""
    for param in params:
        if sharding.is_sharded(param):
            state[param][WHOLE] = sharding.gather_whole(param).to(compute_dtype(param))


def whole_values(params, state: dict) -> tuple[list[Tensor], int]:
    """(every parameter as a whole value: the kept one for sharded parameters, the number of sharded ones
    whose local part no longer matches it)."""
    values, stale = [], 0
    for param in params:
        if sharding.is_sharded(param):
            values.append(state[param][WHOLE])
            stale += not sharding.holds_local_part(param, state[param][WHOLE])
        else:
            values.append(param)
    return values, stale


def reconcile_whole_values(params, state: dict) -> None:
    """After a checkpoint was loaded: keep its whole values if every rank's sharded parameters still hold
    their parts of them, else gather them anew from the parameters (the model's weights win, as for fp32
    masters). A collective; drops whole values saved for parameters that are not sharded here."""
    for param in params:
        if not sharding.is_sharded(param):
            state[param].pop(WHOLE, None)
    held = all(WHOLE in state[p] and sharding.holds_local_part(p, state[p][WHOLE])
               for p in params if sharding.is_sharded(p))
    if not distributed.on_every_rank(held):
        keep_whole_values(params, state)


def write(param: Tensor, value: Tensor, state: dict) -> None:
    """Set a parameter to `value` (the whole value), outside a step: sharded ones keep it whole in state."""
    apply_updates([Update(param, value, "")], state)


def apply_updates(updates: list[Update], state: dict) -> None:
    """Write every new value (cast to the parameter's dtype), or none if any is not finite; keep
    the fp32 master of low-precision parameters in `state` (the optimizer's, keyed by parameter).

    Raises:
        FloatingPointError: an update is not finite (nothing was written).
    """
    if not updates:
        return
    device = updates[0].value.device
    finite = torch.stack([torch.isfinite(update.value).all().to(device) for update in updates])
    if not bool(finite.all()):  # one synchronisation for all updates
        name = updates[int((~finite).nonzero()[0])].module_name
        raise FloatingPointError(f"the update of {name} is not finite; the step was not applied. "
                                 "Lower the learning rate or check the inputs for inf/NaN.")
    for update in updates:
        if sharding.is_sharded(update.param):
            state[update.param][WHOLE] = update.value
            sharding.write_local_part(update.param, update.value)
            continue
        update.param.copy_(update.value.to(update.param.dtype))
        if update.param.dtype in LOW_PRECISION:
            state[update.param][MASTER] = update.value.to(torch.float32)
