"""What PRISM and NaiveDPLoRA share: validation, hooks, dense updates, generator, state_dict.

A logical step is: any number of forward/backward passes (micro-batches), each clipped per
example at the end of its backward pass, then one `step()` that adds noise once, divides by
the EXPECTED batch size, updates and records the step with the accountant. Subclasses define
how LoRA pairs are represented (`_lora_unit`) and updated (`_lora_updates`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from dataclasses import replace
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import _validate, distributed, per_example, probe
from .accounting import PrivacyAccountant, PrivacyBudgetExceeded, max_steps_within
from .functional import StepConfig, dense_step
from .hooks import PerExampleCollector, StepStats, Unit
from .layers import DenseLinear, LoRAPair, find_trainables
from .noise import entropy_seeded_generator, fill_from_os_entropy, gaussian
from .plan import resolve_plan
from .sampling import SamplingCheck, poisson_data_loader


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
                 generator: torch.Generator | str | None = None, **extra_defaults):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be the peft model (an nn.Module), got {type(model).__name__}; prism "
                            "finds the trainable parameters itself, so do not pass model.parameters().")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("pass the model itself (ddp_model.module), not a DistributedDataParallel wrapper: under "
                            "torch.distributed prism sums the clipped per-example gradients over ranks itself, while "
                            "DDP would all-reduce the non-private gradients and hang when a rank's Poisson share is "
                            "empty (see prism.distributed).")
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
        _warn_about_earlier_optimizers(model)
        self._model = model
        self._trainable_names = _trainable_names(model)
        params = [p for pair in self.pairs for p in (pair.lora_A.weight, pair.lora_B.weight)]
        params += [p for d in self.dense for p in d.module.parameters() if p.requires_grad]
        _warn_about_fp16(model)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adaptive=adaptive,
                        **extra_defaults)
        super().__init__([{"params": params}], defaults)
        self._max_grad_norm = float(max_grad_norm)
        self._dense_max_grad_norm = float(max_grad_norm if dense_max_grad_norm is None else dense_max_grad_norm)
        self.loss_reduction = loss_reduction
        self.accountant = (PrivacyAccountant(planned_steps=self.plan.steps) if self.plan.sample_rate is not None
                           else None)
        self._sampling_check = SamplingCheck(self.plan, allow_non_poisson)
        self._allowed_steps: int | None = None
        self.secure_noise = isinstance(generator, str) and generator == "secure"
        self.generator = _checked_generator(generator, params[0].device)
        self.steps_taken = 0
        self._collector = PerExampleCollector(self.max_grad_norm, loss_reduction)
        _COLLECTORS_OF.setdefault(model, weakref.WeakSet()).add(self._collector)
        self._collector.count_forward_passes(model)
        self._lora_units = []
        for index, pair in enumerate(self.pairs):
            unit = self._lora_unit(index, pair)
            self._collector.add_lora_pair(pair.lora_A, pair.lora_B, unit)
            self._lora_units.append(unit)
        self._dense_units = [self._dense_unit(d) for d in self.dense]
        self._owners = [(module, name, getattr(module, name)) for module in
                        [m for pair in self.pairs for m in (pair.lora_A, pair.lora_B)] + [d.module for d in self.dense]
                        for name in ("weight", "bias")
                        if getattr(module, name, None) is not None and getattr(module, name).requires_grad]
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

    def _lora_unit(self, index: int, pair: LoRAPair) -> Unit:
        raise NotImplementedError

    def _lora_updates(self, cfg: StepConfig) -> list[Update]:
        raise NotImplementedError

    def _dense_unit(self, dense: DenseLinear) -> Unit:
        name, module = dense.name, dense.module
        params = [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]
        if len(params) == 1 and params[0] is not module.weight:
            raise ValueError(f"{name}: a dense nn.Linear with a trainable bias but a frozen weight is not "
                             "supported; train both or neither.")
        has_bias = len(params) == 2
        dtype = compute_dtype(module.weight)

        def grads(x, go, grad_scale):
            return per_example.linear_grads(*per_example.in_compute_dtype(dtype, x, go, grad_scale=grad_scale),
                                            has_bias), None

        scale = 1.0 if dense.lora_factor else self.dense_max_grad_norm / self.max_grad_norm
        unit = Unit(name, params, grads, per_example.sum_of_squares, dtype, clip_scale=scale)
        self._collector.add_linear(module, unit)
        return unit

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
        self._collector.discard_unfinished()
        self._refuse_gradients_without_hooks()
        self._refuse_replaced_parameters()
        self._refuse_changed_trainables()
        self._refuse_exceeding_the_budget()
        if self.plan.steps is not None and self.steps_taken == self.plan.steps:
            warnings.warn(f"step {self.steps_taken + 1} goes beyond the {self.plan.steps} steps this optimizer was "
                          "planned (and with target_epsilon calibrated) for: epsilon keeps growing past the plan "
                          "(privacy_spent() reports it). Pass max_epsilon to stop at a budget.", UserWarning,
                          stacklevel=2)
        self._sum_over_ranks()
        self._sampling_check.observe(self._collector.stats.examples)
        group = self.param_groups[0]
        cfg = StepConfig(lr=group["lr"], noise_std=self.noise_std, expected_batch_size=self.expected_batch_size,
                         adaptive=group["adaptive"], betas=group["betas"], eps=group["eps"],
                         weight_decay=group["weight_decay"], **self._extra_config(group))
        # counted before any noise is drawn: a noisy gradient enters the moments even if its write is refused
        self.steps_taken += 1
        self._model._prism_private_steps = getattr(self._model, "_prism_private_steps", 0) + 1
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.plan.sample_rate)
        if self.secure_noise:
            fill_from_os_entropy(self.generator)  # a fresh state, recorded nowhere, for this step's noise
            distributed.broadcast_generator(self.generator)  # rank 0's, under torch.distributed
        try:
            updates = self._lora_updates(cfg)
            for unit in self._dense_units:
                updates += self._dense_updates(unit, cfg)
        finally:
            self._end_step()
        apply_updates(updates)
        self._keep_master_weights(updates)
        return loss

    def value_of(self, param: Tensor, dtype: torch.dtype) -> Tensor:
        """The parameter's current value in `dtype`: its fp32 master copy for bf16/fp16 parameters
        (updates smaller than their rounding step still accumulate), else the parameter itself.

        A master copy that no longer rounds to the parameter (someone wrote to the parameter,
        e.g. loaded other weights) is dropped and the parameter's value is used.
        """
        master = self.state[param].get(MASTER) if param in self.state else None
        if master is not None and not torch.equal(master.to(param.dtype), param.detach()):
            del self.state[param][MASTER]
            master = None
        return (param.detach() if master is None else master).to(dtype)

    def _keep_master_weights(self, updates: list[Update]) -> None:
        for update in updates:
            if update.param.dtype in LOW_PRECISION:
                self.state[update.param][MASTER] = update.value.to(torch.float32)

    def _extra_config(self, group: dict) -> dict:
        return {}

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

    def _refuse_changed_trainables(self) -> None:
        now = _trainable_names(self._model)
        if now != self._trainable_names:
            added, removed = sorted(now - self._trainable_names), sorted(self._trainable_names - now)
            raise RuntimeError(
                "the model's trainable parameters changed since the optimizer was built (set_adapter, or a "
                f"layer frozen or unfrozen): newly trainable {added[:3]}{' ...' if len(added) > 3 else ''}, no "
                f"longer trainable {removed[:3]}{' ...' if len(removed) > 3 else ''}. prism hooks the trainable "
                "modules when it is built; build a new optimizer after changing them.")

    def _refuse_replaced_parameters(self) -> None:
        for module, name, param in self._owners:
            if getattr(module, name) is not param:
                raise RuntimeError(f"a trained parameter ({type(module).__name__}.{name}) was replaced by a new "
                                   "Parameter since the optimizer was built (e.g. by peft's load_adapter); its "
                                   "hooks and state would be lost. Call optimizer.restore_parameters() after loading.")

    def _dense_updates(self, unit: Unit, cfg: StepConfig) -> list[Update]:
        """DP-SGD / DP-AdamW on each parameter: (clipped sum) / b + N(0, (k std)^2 I), k = unit.clip_scale."""
        if unit.clip_scale != 1.0:
            cfg = replace(cfg, noise_std=unit.clip_scale * cfg.noise_std)
        updates = []
        for index, param in enumerate(unit.params):
            value = self.value_of(param, unit.compute_dtype)
            grad = unit.sums[index] / cfg.expected_batch_size if unit.sums else torch.zeros_like(value)
            if cfg.noise_std > 0:
                grad = grad + gaussian(tuple(value.shape), cfg.noise_std, self.generator, value)
            updates.append(Update(param, dense_step(value, grad, self.state[param], cfg), unit.name))
        return updates

    def _sum_over_ranks(self) -> None:
        """Under torch.distributed (W > 1 ranks): check that the replicas are identical, then replace
        every unit's clipped sums (zeros where this rank saw no example) and the step's counts by
        their sums over ranks, so the rest of the step sees the global batch (prism.distributed)."""
        distributed.check_same_world(self._ranks, "this optimizer")
        if self._replicas is None:
            return
        self._replicas.check_identical([p for g in self.param_groups for p in g["params"]], self.generator)
        units = self._lora_units + self._dense_units
        for unit in units:
            if unit.sums is None:
                unit.sums = self._zero_sums(unit)
        stats = self._collector.stats
        counts = torch.tensor([stats.examples, stats.clipped, stats.nonfinite, stats.backward_passes])
        self._replicas.sum_over_ranks([t for unit in units for t in unit.sums] + [counts])
        stats.examples, clipped, nonfinite, stats.backward_passes = counts.tolist()
        stats.set_flag_counts(clipped, nonfinite)

    def _zero_sums(self, unit: Unit) -> list[Tensor]:
        """Clipped sums of a unit that saw no example: zeros shaped like its parameters."""
        return [torch.zeros(p.shape, dtype=unit.compute_dtype, device=p.device) for p in unit.params]

    def _refuse_gradients_without_hooks(self) -> None:
        for unit in self._lora_units + self._dense_units:
            if unit.sums is None and (unit.gradient_arrived or any(p.grad is not None for p in unit.params)):
                raise RuntimeError(
                    "trainable parameters have gradients but prism's per-example hooks saw no example since "
                    "the last step (was the model run through a copy, torch.func, or after remove_hooks()?). "
                    "Refusing a step that would not be private.")

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
        implied = plan.expected_batch_size / plan.sample_rate
        if not math.isclose(len(loader.dataset), implied, rel_tol=1e-9):
            raise ValueError(f"the loader's dataset has {len(loader.dataset)} examples but the optimizer was built for "
                             f"{implied:g} (dataset_size); build it with dataset_size=len(dataset).")
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
            for collector in list(_COLLECTORS_OF.get(self._model, ())):
                stack.enter_context(collector.paused())
            probe.check_rows_are_examples(self._model, self.param_groups[0]["params"], watched, batch, per_example_loss,
                                          probes=probes)

    def budget_allows_another_step(self) -> bool:
        """False when one more step would take epsilon above `max_epsilon` (always True without it)."""
        if self.plan.max_epsilon is None:
            return True
        if self._allowed_steps is None:
            self._allowed_steps = self.accountant.steps + max_steps_within(
                self.plan.max_epsilon, self.plan.delta, self.noise_multiplier, self.plan.sample_rate,
                prior=tuple(self.accountant.history))
        return self.accountant.steps + 1 <= self._allowed_steps

    def _refuse_exceeding_the_budget(self) -> None:
        if not self.budget_allows_another_step():
            raise PrivacyBudgetExceeded(
                f"another step would take epsilon above max_epsilon={self.plan.max_epsilon} at delta="
                f"{self.plan.delta} (spent: {self.privacy_spent()[0]:.4g} after {self.accountant.steps} steps).")

    def _end_step(self) -> None:
        self._collector.reset()
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear `.grad` and discard the clipped sums accumulated since the last step."""
        super().zero_grad(set_to_none=set_to_none)
        self._collector.reset()

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
        generator_state = None if self.secure_noise else self.generator.get_state()
        state["prism"] = dict(steps_taken=self.steps_taken, generator_state=generator_state, **self._settings(),
                              accountant=None if self.accountant is None else self.accountant.state_dict(),
                              sampling_check=self._sampling_check.state_dict())
        return state

    def _settings(self) -> dict:
        """The privacy settings a checkpoint must share with the optimizer that loads it."""
        return dict(noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                    dense_max_grad_norm=self.dense_max_grad_norm, expected_batch_size=self.expected_batch_size,
                    sample_rate=self.plan.sample_rate)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict() of an optimizer built with the same privacy settings.

        Unlike torch's default, floating state keeps its saved dtype (fp32 moments stay fp32
        for bf16 parameters).
        """
        state_dict = dict(state_dict)
        if "prism" not in state_dict:
            raise ValueError("this state_dict has no 'prism' entry: it was not saved by a prism optimizer.")
        extra = state_dict.pop("prism")
        for key, value in self._settings().items():
            saved = extra.get(key, extra["max_grad_norm"] if key == "dense_max_grad_norm" else None)
            if saved != value:
                raise ValueError(f"the checkpoint was saved with {key}={saved}, this optimizer has "
                                 f"{value}; build the optimizer with the checkpoint's settings.")
        if extra["generator_state"] is None and not self.secure_noise:
            raise ValueError("the checkpoint was saved with generator='secure' and holds no noise state; build the "
                             "optimizer with generator='secure' to resume it.")
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, values in saved_state.items():
            param = params[index]
            self.state[param] = {k: v.to(param.device, copy=True) if torch.is_tensor(v) else v
                                 for k, v in values.items()}
        self.steps_taken = extra["steps_taken"]
        if not self.secure_noise:
            # .cpu(): accelerate's AcceleratedOptimizer reloads the state moved to the model's device
            self.generator.set_state(extra["generator_state"].cpu())
        if self.accountant is not None:
            self.accountant.load_state_dict(extra["accountant"])
            self._allowed_steps = None
        self._sampling_check.load_state_dict(extra["sampling_check"])
        self._collector.reset()  # clipped sums of an interrupted step must not join the loaded run

    def __repr__(self) -> str:
        group = self.param_groups[0]
        return (f"{type(self).__name__}(lora_modules={len(self.pairs)}, dense_modules={len(self.dense)}, "
                f"lr={group['lr']}, noise_multiplier={self.noise_multiplier:.4g}, max_grad_norm={self.max_grad_norm}, "
                f"dense_max_grad_norm={self.dense_max_grad_norm}, expected_batch_size={self.expected_batch_size}, "
                f"sample_rate={self.plan.sample_rate}, "
                f"adaptive={group['adaptive']}, loss_reduction={self.loss_reduction!r}, steps_taken={self.steps_taken})")


def compute_dtype(param: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 parameters, fp64 for fp64 ones."""
    return torch.promote_types(param.dtype, torch.float32)


LOW_PRECISION = (torch.bfloat16, torch.float16)
MASTER = "fp32_master"


class Update(NamedTuple):
    """A parameter's new value (in the compute dtype) and its module's name."""

    param: Tensor
    value: Tensor
    module_name: str


def apply_updates(updates: list[Update]) -> None:
    """Write every new value (cast to the parameter's dtype), or none if any is not finite."""
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


_COLLECTORS_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its optimizers' hooks (WeakSet)


def _warn_about_earlier_optimizers(model: nn.Module) -> None:
    """A model already trained privately composes that run's privacy loss with the next one's, which
    a new optimizer's accountant (starting at zero) does not count; live hooks of another optimizer
    would keep collecting every example's gradient."""
    steps = getattr(model, "_prism_private_steps", 0)
    if steps:
        warnings.warn(f"this model already took {steps} private steps with another prism optimizer. Unless you load "
                      "that run's checkpoint into this optimizer (its state carries the accountant), the epsilon "
                      "reported here covers this optimizer's steps only, and the two runs' privacy losses compose.",
                      UserWarning, stacklevel=4)
    if any(collector.hooked for collector in _COLLECTORS_OF.get(model, ())):
        warnings.warn("another prism optimizer's hooks are still attached to this model and keep collecting every "
                      "example's gradient: call its remove_hooks() first.", UserWarning, stacklevel=4)


def _warn_about_fp16(model: nn.Module) -> None:
    """fp16 trainables backpropagate in fp16, whose smallest normal number is 6.1e-5: small
    per-example gradients lose digits or flush to zero before they are clipped."""
    names = [name for name, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if names:
        warnings.warn(f"{len(names)} trainable parameters are float16 (e.g. {names[0]}): their backward pass runs "
                      "in fp16, where small per-example gradients underflow. Keep the adapters in fp32 or bf16 "
                      "(peft's default casts them to fp32), or scale the loss up and let prism divide the factor "
                      "out: opt.watch_loss(loss); (loss * 1024).backward().", UserWarning, stacklevel=4)


def _trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}
