"""The last stage of a step: new parameter values written, all or none, with fp32 masters.

Parameters stored in bf16/fp16 keep an fp32 master copy in the optimizer state, so updates
smaller than the low-precision rounding step still accumulate across steps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)
MASTER = "fp32_master"


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
    e.g. loaded other weights) is dropped and the parameter's value is used.
    """
    master = state.get(MASTER)
    if master is not None and not torch.equal(master.to(param.dtype), param.detach()):
        del state[MASTER]
        master = None
    return (param.detach() if master is None else master).to(dtype)


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
        update.param.copy_(update.value.to(update.param.dtype))
        if update.param.dtype in LOW_PRECISION:
            state[update.param][MASTER] = update.value.to(torch.float32)
