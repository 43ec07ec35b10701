"""The optimizer shell every prism optimizer shares: build the pipeline, then run it once per step.

A logical step is any number of forward/backward passes (micro-batches), followed by one `step()`:

    collect -> per-example blocks -> clip        during each backward pass (pipeline.collect
                                                 schedules pipeline.clip at its end)
    guards                                       first thing in step() (optim.guards)
    reduce across ranks                          pipeline.reduce
    account                                      pipeline.account (before any noise is drawn)
    noise -> precondition -> retract             per module, in the subclass's updates
                                                 (functional.prism_module_step / dense_step)
    write                                        optim.updates (all or nothing)

Subclasses define how a LoRA pair is turned into a pipeline unit (`_lora_unit`) and how the
privatised sums of the LoRA units become new factors (`_lora_updates`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .. import _validate, distributed, probe
from ..accounting import PrivacyAccountant
from ..functional import StepConfig
from ..layers import LoRAPair, find_trainables
from ..pipeline import account, reduce
from ..pipeline.collect import PerExampleCollector, collectors_of
from ..pipeline.noise import entropy_seeded_generator, fill_from_os_entropy
from ..pipeline.units import StepStats, Unit
from ..plan import resolve_plan
from ..sampling import SamplingCheck, poisson_data_loader
from . import checkpoint, dense, guards
from .groups import build_param_groups
from .updates import Update, apply_updates, keep_whole_values, value_of, whole_values


class DPLoRAOptimizer(torch.optim.Optimizer):
    """Base class of prism's private optimizers; see PRISM for the arguments."""

    _frozen_lora_A = False  # whether LoRA layers with a frozen lora_A (FFA-LoRA) are accepted

    def __init__(self, model: nn.Module, *, lr: float, max_grad_norm: float, dense_max_grad_norm: float | None = None,
                 noise_multiplier: float | None = None, expected_batch_size: float | None = None,
                 target_epsilon: float | None = None, delta: float | None = None, sample_rate: float | None = None,
                 dataset_size: int | None = None,
                 steps: int | None = None, epochs: float | None = None, max_epsilon: float | None = None,
                 allow_non_poisson: bool = False, adaptive: bool = True, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, loss_reduction: str = "mean",
                 generator: torch.Generator | str | None = None, groups: Sequence[dict] | None = None,
                 **extra_defaults):
        guards.check_model_argument(model)
        _validate.non_negative(lr=lr, weight_decay=weight_decay)
        _validate.positive(max_grad_norm=max_grad_norm, eps=eps)
        if dense_max_grad_norm is not None:
            _validate.positive(dense_max_grad_norm=dense_max_grad_norm)
            if not 1e-6 <= dense_max_grad_norm / max_grad_norm <= 1e6:
                raise ValueError(f"dense_max_grad_norm / max_grad_norm = {dense_max_grad_norm / max_grad_norm:.3g} "
                                 "is outside [1e-6, 1e6], where the weighted clip loses fp32 precision; bring "
                                 "the two bounds closer.")
        _validate.in_unit_interval(**{"betas[0]": betas[0], "betas[1]": betas[1]})
        _validate.one_of({"mean", "sum"}, loss_reduction=loss_reduction)
        self.plan = resolve_plan(noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=delta,
                                 expected_batch_size=expected_batch_size, sample_rate=sample_rate,
                                 dataset_size=dataset_size, steps=steps, epochs=epochs, max_epsilon=max_epsilon)
        self.pairs, self.dense = find_trainables(model, frozen_lora_A=self._frozen_lora_A)
        guards.warn_about_earlier_optimizers(model)
        guards.warn_about_fp16(model)
        self._model = model
        params = [p for pair in self.pairs for p in (pair.lora_A.weight, pair.lora_B.weight)]
        params += [p for d in self.dense for p in d.module.parameters() if p.requires_grad]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adaptive=adaptive,
                        **extra_defaults)
        pair_factors = [(pair.name, pair.lora_A.weight, pair.lora_B.weight) for pair in self.pairs]
        self._building = True
        super().__init__(build_param_groups(params, pair_factors, groups), defaults)
        self._building = False
        guards.check_sharded_params(model, params)
        keep_whole_values(params, self.state)  # sharded (FSDP2) parameters: gathered once, kept whole
        self._max_grad_norm = float(max_grad_norm)
        self._dense_max_grad_norm = float(max_grad_norm if dense_max_grad_norm is None else dense_max_grad_norm)
        self.loss_reduction = loss_reduction
        self.accountant = (PrivacyAccountant(planned_steps=self.plan.steps) if self.plan.sample_rate is not None
                           else None)
        self._budget = account.Budget(self.plan, self.accountant)
        self._sampling_check = SamplingCheck(self.plan, allow_non_poisson)
        self.secure_noise = isinstance(generator, str) and generator == "secure"
        self.generator = _checked_generator(generator, params[0].device)
        self.steps_taken = 0
        # the pipeline: hooks (collect) feeding one unit per trained module
        self._collector = PerExampleCollector(self.max_grad_norm, loss_reduction)
        self._collector.count_forward_passes(model)
        self._lora_units = []
        for index, pair in enumerate(self.pairs):
            unit = self._lora_unit(index, pair)
            self._collector.add_lora_pair(pair.lora_A, pair.lora_B, unit)
            self._lora_units.append(unit)
        self._dense_units = []
        for layer in self.dense:
            scale = 1.0 if layer.lora_factor else self.dense_max_grad_norm / self.max_grad_norm
            unit = dense.dense_unit(layer, clip_scale=scale)
            self._collector.add_linear(layer.module, unit)
            self._dense_units.append(unit)
        owners = [(module, name, getattr(module, name)) for module in
                  [m for pair in self.pairs for m in (pair.lora_A, pair.lora_B)] + [d.module for d in self.dense]
                  for name in ("weight", "bias")
                  if getattr(module, name, None) is not None and getattr(module, name).requires_grad]
        self._owners = owners
        self._guards = guards.StepGuards(model, owners, self._units, self._collector, self.plan, self._budget)
        self._ranks = distributed.world()[0]
        self._replicas = (distributed.Replicas(model, params, self.generator, self._settings())
                          if self._ranks > 1 else None)

    @property
    def noise_multiplier(self) -> float:
        """sigma (read-only: clipping, noise and accounting must agree for the whole run)."""
        return self.plan.noise_multiplier

    @property
    def max_grad_norm(self) -> float:
        """C (read-only)."""
        return self._max_grad_norm

    @property
    def dense_max_grad_norm(self) -> float:
        """C_D, the dense parameters' clipping scale in the joint clip (read-only; default C)."""
        return self._dense_max_grad_norm

    @property
    def expected_batch_size(self) -> float:
        """b = q N (read-only)."""
        return self.plan.expected_batch_size

    @property
    def noise_std(self) -> float:
        """Std of the noise on the averaged LoRA gradient: sigma C / b (dense layers: sigma C_D / b)."""
        return self.noise_multiplier * self.max_grad_norm / self.expected_batch_size

    @property
    def stats(self) -> StepStats:
        """Counters of the logical step in progress (examples seen, clipped, non-finite)."""
        return self._collector.stats

    def clipped_sums(self) -> dict[str, list[Tensor]]:
        """Copies of the clipped per-example sums accumulated since the last step, by module name.

        PRISM's LoRA modules: [Y_sum (m, r), W_sum (n, r)], the tangent blocks' sums (docs/method.md
        3.1); NaiveDPLoRA's: [grad of lora_B.weight, grad of lora_A.weight]; dense layers: [weight,
        bias if trained]. Modules no example reached are absent. NOT private (no noise is in them
        yet): for tests and debugging only; never log or publish them.
        """
        return {unit.name: [s.clone() for s in unit.sums] for unit in self._units if unit.sums is not None}

    @property
    def _units(self) -> list[Unit]:
        return self._lora_units + self._dense_units

    def _lora_unit(self, index: int, pair: LoRAPair) -> Unit:
        raise NotImplementedError

    def _lora_updates(self, configs: dict[int, StepConfig]) -> list[Update]:
        """New factors of every LoRA pair; `configs` maps id(parameter) to its group's StepConfig."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """Privatise the clipped sums accumulated since the last step and update the model.

        Adds noise exactly once per call, also when no example was seen (an empty Poisson
        batch), and leaves every trainable parameter's non-private `.grad` cleared.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # collect, per-example blocks and clip already ran, at the end of every backward pass
        self._guards.before_step(self.steps_taken)
        reduce.sum_over_ranks(self._units, self.stats, self._ranks, self._replicas,
                              *whole_values(self._params(), self.state), self.generator)
        self._guards.refuse_a_dead_adapter(self.stats)
        self._sampling_check.observe(self.stats.examples)
        # accounted before any noise is drawn: a noisy gradient enters the moments even if its write is refused
        self.steps_taken += 1
        self._guards.note_step()
        account.record_step(self.accountant, self.plan)
        if self.secure_noise:
            fill_from_os_entropy(self.generator)  # a fresh state, recorded nowhere, for this step's noise
            distributed.broadcast_generator(self.generator)  # rank 0's, under torch.distributed
        try:
            configs = self._step_configs()
            updates = self._lora_updates(configs)  # noise -> precondition -> retract, per LoRA pair
            for unit in self._dense_units:
                updates += dense.euclidean_updates(unit, configs, self.state, self.generator)
        finally:
            self._end_step()
        apply_updates(updates, self.state)
        return loss

    def _step_configs(self) -> dict[int, StepConfig]:
        """id(parameter) -> the StepConfig of its parameter group."""
        configs = {}
        for group in self.param_groups:
            cfg = StepConfig(lr=group["lr"], noise_std=self.noise_std, expected_batch_size=self.expected_batch_size,
                             adaptive=group["adaptive"], betas=group["betas"], eps=group["eps"],
                             weight_decay=group["weight_decay"], **self._extra_config(group))
            configs.update((id(p), cfg) for p in group["params"])
        return configs

    def value_of(self, param: Tensor, dtype: torch.dtype) -> Tensor:
        """The parameter's current value in `dtype` (its fp32 master copy for bf16/fp16 parameters)."""
        return value_of(param, self.state[param] if param in self.state else {}, dtype)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _extra_config(self, group: dict) -> dict:
        return {}

    def add_param_group(self, param_group: dict) -> None:
        """Refused after construction: prism builds its groups from the model (use `groups=`)."""
        if not getattr(self, "_building", True):
            raise ValueError("prism builds its parameter groups from the model when it is constructed; give per-group "
                             "options there: PRISM(model, ..., groups=[{'params': head.parameters(), 'lr': 1e-3}]).")
        super().add_param_group(param_group)

    def restore_parameters(self) -> int:
        """Put back trained parameters that a loader replaced by new Parameter objects (peft's
        load_adapter does so for bf16 adapters, casting them to fp32): the new value is copied into
        the optimizer's parameter, which is registered on its module again, so hooks, optimizer
        state and fp32 masters stay attached. Returns how many were put back."""
        restored = 0
        for module, name, param in self._owners:
            current = getattr(module, name)
            if current is not param:
                with torch.no_grad():
                    param.copy_(current.detach().to(param.dtype))
                setattr(module, name, param)
                restored += 1
        return restored

    def get_epsilon(self, delta: float | None = None) -> tuple[float, float, float]:
        """(lower, estimate, upper) epsilon spent so far at `delta` (default: the optimizer's delta)."""
        if self.accountant is None:
            raise RuntimeError("this optimizer cannot account: give sample_rate (or dataset_size) when building it.")
        delta = self.plan.delta if delta is None else delta
        if delta is None:
            raise ValueError("give delta here or when building the optimizer.")
        return self.accountant.get_epsilon(delta)

    def privacy_spent(self, delta: float | None = None) -> tuple[float, float]:
        """(epsilon, delta) spent so far; epsilon is the accountant's upper bound."""
        delta = self.plan.delta if delta is None else delta
        return self.get_epsilon(delta)[2], delta

    def watch_loss(self, loss: Tensor) -> None:
        """Make per-example gradients immune to any constant factor applied to `loss` later.

        Training loops often rescale the loss before backward (Hugging Face Trainer divides by the
        gradient-accumulation steps, a GradScaler multiplies). Call this on the loss you computed
        (sum or mean of per-example losses, as `loss_reduction` says) before handing it on: the
        factor is measured during backward and divided out before clipping.
        """
        self._collector.watch_loss(loss)

    def poisson_data_loader(self, loader: DataLoader, *, generator: torch.Generator | None = None) -> DataLoader:
        """`prism.poisson_data_loader(loader)` with this optimizer's sampling rate and the planned steps
        it has not taken yet (a resumed run continues), so the loader draws exactly what the
        accountant assumes (see prism.sampling).

        Raises:
            ValueError: the optimizer has no rate (give dataset_size) or no planned steps (give steps
                or epochs), or `loader.dataset` is not the dataset_size it was built for.
        """
        plan = self.plan
        if plan.sample_rate is None or plan.steps is None:
            raise ValueError("the optimizer needs dataset_size (or sample_rate) and steps (or epochs) to build the "
                             "loader; give them when building it.")
        remaining = plan.steps - self.steps_taken
        if remaining <= 0:
            raise ValueError(f"the optimizer has taken all {plan.steps} planned steps; nothing is left to load.")
        plan.check_dataset_size(len(loader.dataset), what="loader.dataset")
        return poisson_data_loader(loader, sample_rate=plan.sample_rate, steps=remaining, generator=generator)

    def check_examples(self, batch, per_example_loss: Callable[[nn.Module, object], Tensor], *,
                       probes: int = 4) -> None:
        """Raise `prism.probe.RowsAreNotExamples` if a trained module's rows are not the examples of `batch`.

        The hooks check each module's row COUNT on every pass; this one-off probe checks where rows
        come from: the loss of example j reaches no other example's row (backward), and changing one
        example, or padding the batch one column further, changes no other example's rows or loss
        (forward). Run it once before training on a batch of >= 2 examples, with the loss used for
        training; it changes nothing (see prism.probe). The Hugging Face integration runs it on the
        first training micro-batch.

        Args:
            batch: a batch in the form `per_example_loss` takes.
            per_example_loss: (model, batch) -> (b,) per-example losses.
            probes: how many examples' losses are back-propagated on their own.
        """
        watched = [(f"{pair.name}.lora_A", pair.lora_A, "input") for pair in self.pairs]
        watched += [(f"{pair.name}.lora_B", pair.lora_B, "output") for pair in self.pairs]
        watched += [(dense.name, dense.module, kind) for dense in self.dense for kind in ("input", "output")]
        with contextlib.ExitStack() as stack:  # every prism optimizer's hooks on the model, if several are attached
            for collector in collectors_of(self._model):
                stack.enter_context(collector.paused())
            probe.check_rows_are_examples(self._model, self._params(), watched, batch, per_example_loss, probes=probes)

    def budget_allows_another_step(self) -> bool:
        """False when one more step would take epsilon above `max_epsilon` (always True without it)."""
        return self._budget.allows_another_step()

    def _end_step(self) -> None:
        self._collector.reset()
        for p in self._params():
            p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear `.grad` and discard the clipped sums accumulated since the last step."""
        super().zero_grad(set_to_none=set_to_none)
        self._collector.reset()

    @contextlib.contextmanager
    def placeholder_pass(self):
        """Forward and backward passes inside record nothing: no example, no per-example gradient, and the
        parameters' gradients are dropped.

        Under FSDP2 every rank must run the same forward and backward passes (they gather the base's
        shards), but a rank's share of a Poisson draw or micro-batch can be empty, and models cannot
        always run an empty batch. Such a rank runs the pass on any batch of the right form (say the
        previous one, or a public placeholder) inside this block, so the collectives match and nothing of
        it enters the step:

            with optimizer.placeholder_pass():
                model(**placeholder).loss.backward()
        """
        with self._collector.paused():
            yield

    def remove_hooks(self) -> None:
        """Detach prism's hooks from the model (the optimizer cannot step privately afterwards)."""
        self._collector.remove()

    def state_dict(self) -> dict:
        """torch's format ('state', 'param_groups') plus a 'prism' entry: steps taken, the privacy
        settings and the noise generator's state (so a resumed run continues the same noise stream).

        The generator state lets whoever holds the checkpoint reproduce the noise: keep checkpoints
        as confidential as the training data; release only the trained adapter. With
        generator="secure" no state is saved (None): a resumed run draws fresh noise, so it is
        not bit-for-bit the uninterrupted run, and the checkpoint reveals no noise.
        """
        state = super().state_dict()
        state[checkpoint.KEY] = checkpoint.privacy_entry(self)
        return state

    def _settings(self) -> dict:
        """The privacy settings a checkpoint must share with the optimizer that loads it."""
        return dict(noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                    dense_max_grad_norm=self.dense_max_grad_norm, expected_batch_size=self.expected_batch_size,
                    sample_rate=self.plan.sample_rate)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict() of an optimizer built with the same privacy settings (under torch.distributed:
        on every rank).

        Unlike torch's default, floating state keeps its saved dtype (fp32 moments stay fp32
        for bf16 parameters).
        """
        checkpoint.load(self, state_dict, super().load_state_dict)

    def __repr__(self) -> str:
        group = self.defaults
        return (f"{type(self).__name__}(lora_modules={len(self.pairs)}, dense_modules={len(self.dense)}, "
                f"lr={group['lr']}, param_groups={len(self.param_groups)}, noise_multiplier={self.noise_multiplier:.4g}, "
                f"max_grad_norm={self.max_grad_norm}, "
                f"dense_max_grad_norm={self.dense_max_grad_norm}, expected_batch_size={self.expected_batch_size}, "
                f"sample_rate={self.plan.sample_rate}, "
                f"adaptive={group['adaptive']}, loss_reduction={self.loss_reduction!r}, steps_taken={self.steps_taken})")


def _checked_generator(generator: torch.Generator | str | None, device: torch.device) -> torch.Generator:
    if isinstance(generator, str) and generator != "secure":
        raise ValueError(f"generator must be a torch.Generator, None or 'secure', got {generator!r}")
    if generator is None or isinstance(generator, str):
        return entropy_seeded_generator(device)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the parameters are on {device}; create it "
                         f"with torch.Generator(device='{device.type}').")
    return generator
