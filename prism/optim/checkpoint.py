"""Checkpoints: torch's optimizer state_dict plus the privacy bookkeeping under a "prism" key.

The extra entry holds the steps taken, the privacy settings (a checkpoint loads only into an
optimizer with the same ones), the accountant's history, the sampling check and the noise
generator's state (None with generator="secure"). Floating state keeps its saved dtype (torch's
loader would cast fp32 moments of bf16 parameters down to bf16).
"""

from __future__ import annotations

import warnings

import torch

from .updates import reconcile_whole_values

KEY = "prism"
# what checkpoints from before a param-group option existed meant by it (not necessarily today's default)
IMPLIED_GROUP_OPTIONS = dict(metric="frobenius", preconditioner="one_sided")


def load(optimizer, state_dict: dict, load_torch_part) -> None:
    """Load a prism checkpoint into `optimizer`; `load_torch_part` is torch.optim.Optimizer's own loader.

    Param-group options added since the checkpoint was saved take the value such checkpoints ran with
    (IMPLIED_GROUP_OPTIONS), else their defaults (torch's loader drops group keys the checkpoint lacks);
    floating state keeps its saved dtype; whole values of sharded
    parameters are kept or re-gathered; the clipped sums of an interrupted step are dropped.
    """
    torch_part, extra = split_privacy_entry(optimizer, state_dict)
    built = [{key: group.get(key) for key in IMPLIED_GROUP_OPTIONS} for group in optimizer.param_groups]
    load_torch_part(torch_part)
    for group, before in zip(optimizer.param_groups, built):
        for key, value in optimizer.defaults.items():
            group.setdefault(key, IMPLIED_GROUP_OPTIONS.get(key, value))
        changed = {k: (v, group[k]) for k, v in before.items() if v is not None and group.get(k) != v}
        if changed:
            warnings.warn("the checkpoint's settings replace the optimizer's: " + ", ".join(
                f"{k}={new!r} (built with {old!r})" for k, (old, new) in changed.items()) +
                "; the run resumes as it was trained", stacklevel=3)
    restore_state_dtypes(optimizer, torch_part["state"])
    reconcile_whole_values(optimizer._params(), optimizer.state)
    load_privacy_entry(optimizer, extra)
    optimizer._budget.forget()
    optimizer._collector.reset()


def privacy_entry(optimizer) -> dict:
    """The "prism" entry of `optimizer`'s state_dict."""
    generator_state = None if optimizer.secure_noise else optimizer.generator.get_state()
    return dict(steps_taken=optimizer.steps_taken, generator_state=generator_state, **optimizer._settings(),
                accountant=None if optimizer.accountant is None else optimizer.accountant.state_dict(),
                sampling_check=optimizer._sampling_check.state_dict())


def split_privacy_entry(optimizer, state_dict: dict) -> tuple[dict, dict]:
    """(torch's part, the "prism" entry) of a checkpoint, checked against `optimizer`'s settings.

    Raises:
        ValueError: not a prism checkpoint, other privacy settings, or a secure-noise checkpoint
            loaded into an optimizer without generator="secure".
    """
    state_dict = dict(state_dict)
    if KEY not in state_dict:
        raise ValueError("this state_dict has no 'prism' entry: it was not saved by a prism optimizer.")
    extra = state_dict.pop(KEY)
    # what checkpoints from before a setting existed meant by it
    implied = dict(dense_max_grad_norm=extra["max_grad_norm"], metric=IMPLIED_GROUP_OPTIONS["metric"])
    for key, value in optimizer._settings().items():
        saved = extra.get(key, implied.get(key))
        if saved != value:
            raise ValueError(f"the checkpoint was saved with {key}={saved}, this optimizer has "
                             f"{value}; build the optimizer with the checkpoint's settings.")
    if extra["generator_state"] is None and not optimizer.secure_noise:
        raise ValueError("the checkpoint was saved with generator='secure' and holds no noise state; build the "
                         "optimizer with generator='secure' to resume it.")
    return state_dict, extra


def restore_state_dtypes(optimizer, saved_state: dict) -> None:
    """Put the saved per-parameter state back as saved (dtype kept), on each parameter's device."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in saved_state.items():
        param = params[index]
        optimizer.state[param] = {k: v.to(param.device, copy=True) if torch.is_tensor(v) else v
                                  for k, v in values.items()}


def load_privacy_entry(optimizer, extra: dict) -> None:
    """Continue the saved run: steps, noise stream (unless secure), accountant and sampling check."""
    optimizer.steps_taken = extra["steps_taken"]
    if not optimizer.secure_noise:
        # .cpu(): accelerate's AcceleratedOptimizer reloads the state moved to the model's device
        optimizer.generator.set_state(extra["generator_state"].cpu())
    if optimizer.accountant is not None:
        optimizer.accountant.load_state_dict(extra["accountant"])
    optimizer._sampling_check.load_state_dict(extra["sampling_check"])
