"""Parameter groups: per-group learning rate and weight decay, one privacy mechanism for all.

prism builds its parameter groups from the model. `groups` lets a user give some trained
parameters their own options, torch-style:

    PRISM(model, lr=5e-3, ..., groups=[{"params": model.classifier.parameters(), "lr": 1e-3}])

Every trainable parameter not named in `groups` is in the default group (the constructor's
options). Groups change only how the privatised gradient is USED (step size, decay, moments);
clipping and noise stay over the whole example, all groups together, so the privacy guarantee
does not depend on the grouping. Both factors of a LoRA pair must share a group (PRISM's step
is a step of Z = A B^T, not of either factor).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import Tensor

GROUP_OPTIONS = frozenset({"lr", "weight_decay", "betas", "eps"})


def build_param_groups(trainable: Sequence[Tensor], pairs: Iterable[tuple[str, Tensor, Tensor]],
                       groups: Sequence[dict] | None) -> list[dict]:
    """torch param groups: the default group (every parameter not in `groups`), then the user's.

    Args:
        trainable: every parameter the optimizer trains, in its order.
        pairs: (name, lora_A.weight, lora_B.weight) of each LoRA pair.
        groups: dicts with "params" and any of GROUP_OPTIONS, or None.

    Raises:
        ValueError: a group that is not a dict with "params", an option other than GROUP_OPTIONS,
            a parameter that the optimizer does not train or that is in two groups, or a LoRA pair
            split between groups.
    """
    if groups is None:
        return [{"params": list(trainable)}]
    known = {id(p) for p in trainable}
    group_of: dict[int, int] = {}
    user_groups = []
    for index, group in enumerate(groups):
        if not isinstance(group, dict) or "params" not in group:
            raise ValueError(f"groups[{index}] must be a dict with 'params' (and options such as 'lr'), got "
                             f"{type(group).__name__}.")
        unknown = set(group) - GROUP_OPTIONS - {"params"}
        if unknown:
            raise ValueError(f"groups[{index}] sets {sorted(unknown)}; a group may set only {sorted(GROUP_OPTIONS)}. "
                             "Clipping and noise are one mechanism over the whole example and cannot differ per group.")
        params = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
        for p in params:
            if id(p) not in known:
                raise ValueError(f"groups[{index}] holds a parameter of shape {tuple(p.shape)} that this optimizer does "
                                 "not train (frozen, or not part of the model it was built on).")
            if id(p) in group_of:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is in groups[{group_of[id(p)]}] and "
                                 f"groups[{index}]; put each parameter in one group.")
            group_of[id(p)] = index
        user_groups.append({**group, "params": params})
    for name, lora_A, lora_B in pairs:
        if group_of.get(id(lora_A)) != group_of.get(id(lora_B)):
            raise ValueError(f"{name}: lora_A and lora_B are in different parameter groups; a LoRA pair is trained "
                             "as one matrix Z = lora_B @ lora_A, so put both factors in the same group.")
    default = [p for p in trainable if id(p) not in group_of]
    return ([{"params": default}] if default else []) + user_groups
