"""Guards: the checks that refuse to build an optimizer or take a step that would not be private.

Nothing here computes anything the step uses; each function raises (or warns) with the problem
and its fix. The optimizer runs `StepGuards.before_step` first thing in every `step()`.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from .. import sharding
from ..pipeline.account import Budget
from ..pipeline.collect import PerExampleCollector, collectors_of
from ..pipeline.units import Unit
from ..plan import PrivacyPlan


def check_model_argument(model) -> None:
    """The optimizer takes the peft model itself (FSDP2-sharded or not), never its parameters or a wrapper."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the peft model (an nn.Module), got {type(model).__name__}; prism "
                        "finds the trainable parameters itself, so do not pass model.parameters().")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("pass the model itself (ddp_model.module), not a DistributedDataParallel wrapper: under "
                        "torch.distributed prism sums the clipped per-example gradients over ranks itself, while "
                        "DDP would all-reduce the non-private gradients and hang when a rank's Poisson share is "
                        "empty (see prism.distributed).")
    from torch.distributed.fsdp import FullyShardedDataParallel
    if isinstance(model, nn.DataParallel):
        raise TypeError("nn.DataParallel splits each batch across devices in threads, behind prism's hooks; launch one "
                        "process per device with torchrun instead (prism sums the clipped gradients over processes).")
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError("FSDP1 (FullyShardedDataParallel) flattens the parameters prism hooks and trains; shard with "
                        "FSDP2 instead (torch.distributed.fsdp.fully_shard on each decoder layer, then on the root, "
                        "and build the optimizer after it), or use plain data parallel.")


def check_sharded_params(model: nn.Module, params: Sequence[torch.Tensor]) -> None:
    """Trained DTensor parameters must be placed as prism can cut them (prism.sharding)."""
    names = {id(p): name for name, p in model.named_parameters()}
    for p in params:
        if sharding.is_sharded(p):
            sharding.check_placements(p, names.get(id(p), "a trained parameter"))


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def warn_about_earlier_optimizers(model: nn.Module) -> None:
    """A model already trained privately composes that run's privacy loss with the next one's, which
    a new optimizer's accountant (starting at zero) does not count; live hooks of another optimizer
    would keep collecting every example's gradient."""
    steps = getattr(model, PRIVATE_STEPS, 0)
    if steps:
        warnings.warn(f"this model already took {steps} private steps with another prism optimizer. Unless you load "
                      "that run's checkpoint into this optimizer (its state carries the accountant), the epsilon "
                      "reported here covers this optimizer's steps only, and the two runs' privacy losses compose.",
                      UserWarning, stacklevel=4)
    if any(collector.hooked for collector in collectors_of(model)):
        warnings.warn("another prism optimizer's hooks are still attached to this model and keep collecting every "
                      "example's gradient: call its remove_hooks() first.", UserWarning, stacklevel=4)


def warn_about_fp16(model: nn.Module) -> None:
    """fp16 trainables backpropagate in fp16, whose smallest normal number is 6.1e-5: small
    per-example gradients lose digits or flush to zero before they are clipped."""
    names = [name for name, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if names:
        warnings.warn(f"{len(names)} trainable parameters are float16 (e.g. {names[0]}): their backward pass runs "
                      "in fp16, where small per-example gradients underflow. Keep the adapters in fp32 or bf16 "
                      "(peft's default casts them to fp32), or scale the loss up and let prism divide the factor "
                      "out: opt.watch_loss(loss); (loss * 1024).backward().", UserWarning, stacklevel=4)


PRIVATE_STEPS = "_prism_private_steps"
DEAD_STEPS = 3  # consecutive steps with examples forwarded but all clipped sums zero before refusing to go on  # attribute on the model: private steps any prism optimizer took on it


class StepGuards:
    """Everything checked before a step: unfinished or unhooked backward passes, parameters replaced
    or trainables changed since the optimizer was built, the budget, and steps beyond the plan."""

    def __init__(self, model: nn.Module, owners: Sequence[tuple[nn.Module, str, torch.Tensor]],
                 units: Sequence[Unit], collector: PerExampleCollector, plan: PrivacyPlan, budget: Budget):
        self.model = model
        self.owners = list(owners)
        self.units = list(units)
        self.collector = collector
        self.plan = plan
        self.budget = budget
        self.trainable_names = trainable_names(model)
        self.dead_steps = 0

    def before_step(self, steps_taken: int) -> None:
        """Raise before a step that would not be private or would exceed the budget; warn past the plan."""
        self.collector.discard_unfinished()
        self._refuse_gradients_without_hooks()
        self._refuse_replaced_parameters()
        self._refuse_changed_trainables()
        self.budget.refuse_exceeding()
        if self.plan.steps is not None and steps_taken == self.plan.steps:
            warnings.warn(f"step {steps_taken + 1} goes beyond the {self.plan.steps} steps this optimizer was "
                          "planned (and with target_epsilon calibrated) for: epsilon keeps growing past the plan "
                          "(privacy_spent() reports it). Pass max_epsilon to stop at a budget.", UserWarning,
                          stacklevel=4)

    def refuse_a_dead_adapter(self, stats) -> None:
        """Raise when, for DEAD_STEPS steps in a row, examples were forwarded but no gradient reached any
        trained parameter (every clipped sum zero or absent): the adapter is silently not training.

        A learning rate of 0 (warm-up) does not trip it (gradients still arrive), nor do empty batches.
        The signal is computed from the private batch without noise, like the logged loss.
        """
        dead = False
        if stats.forwarded > 0:  # one host synchronisation for all units
            totals = [s.abs().sum().to(self.units[0].params[0].device) for unit in self.units if unit.sums
                      for s in unit.sums]
            dead = not totals or not bool(torch.stack(totals).sum())
        self.dead_steps = self.dead_steps + 1 if dead else 0
        if self.dead_steps >= DEAD_STEPS:
            self.dead_steps = 0
            raise RuntimeError(
                f"for {DEAD_STEPS} steps in a row examples went through the model but no gradient reached the "
                "trained parameters (every clipped per-example sum is zero): the adapter is not training. Likely "
                "causes: the adapter is disabled, frozen or detached (model.disable_adapter(), a copy of the "
                "model, torch.no_grad() around the forward pass), or the loss does not depend on it (every label "
                "-100, e.g. prompts longer than the maximum length or a completion mask that removes every "
                "token; a loss multiplied by 0). Fix the loss or the model and build a new optimizer.")

    def note_step(self) -> None:
        """Count the step on the model, so a later optimizer on it warns that privacy losses compose."""
        setattr(self.model, PRIVATE_STEPS, getattr(self.model, PRIVATE_STEPS, 0) + 1)

    def _refuse_gradients_without_hooks(self) -> None:
        for unit in self.units:
            if unit.sums is None and (unit.gradient_arrived or any(p.grad is not None for p in unit.params)):
                raise RuntimeError(
                    "trainable parameters have gradients but prism's per-example hooks saw no example since "
                    "the last step (was the model run through a copy, torch.func, or after remove_hooks()?). "
                    "Refusing a step that would not be private.")

    def _refuse_replaced_parameters(self) -> None:
        for module, name, param in self.owners:
            if getattr(module, name) is not param:
                if sharding.is_sharded(getattr(module, name)) and not sharding.is_sharded(param):
                    raise RuntimeError("the model was sharded (fully_shard) after the optimizer was built, so the "
                                       "optimizer holds parameters the model no longer uses; build the optimizer "
                                       "after fully_shard.")
                raise RuntimeError(f"a trained parameter ({type(module).__name__}.{name}) was replaced by a new "
                                   "Parameter since the optimizer was built (e.g. by peft's load_adapter); its "
                                   "hooks and state would be lost. Call optimizer.restore_parameters() after loading.")

    def _refuse_changed_trainables(self) -> None:
        now = trainable_names(self.model)
        if now != self.trainable_names:
            added, removed = sorted(now - self.trainable_names), sorted(self.trainable_names - now)
            raise RuntimeError(
                "the model's trainable parameters changed since the optimizer was built (set_adapter, or a "
                f"layer frozen or unfrozen): newly trainable {added[:3]}{' ...' if len(added) > 3 else ''}, no "
                f"longer trainable {removed[:3]}{' ...' if len(removed) > 3 else ''}. prism hooks the trainable "
                "modules when it is built; build a new optimizer after changing them.")
