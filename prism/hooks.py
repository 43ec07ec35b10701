"""In-place hooks that turn each backward pass into clipped per-example sums.

The hooks sit on the user's own modules (peft's lora_A / lora_B and dense nn.Linear layers);
the model is never wrapped. For each forward call with gradients enabled they keep references
to the tensors autograd keeps anyway (the inputs of lora_A and lora_B) and register a hook on
the output. When that output's gradient arrives, a `Unit` turns (inputs, output gradient) into
per-example tensors. At the end of the backward pass (an autograd callback) the collector knows
every module's contribution, computes each example's GLOBAL norm, clips, and adds the clipped
sums to the step's accumulators; per-example tensors are then dropped. Gradient accumulation
over several micro-batches therefore only ever accumulates clipped sums.

Formal guarantees: per backward pass, every example i of the micro-batch contributes
alpha_i (t_i over all units) with global norm <= max_grad_norm (see clipping.py). Refused
with an error instead of silently breaking that bound:
- a gradient reaching a hooked output twice (backward twice through one forward pass);
- one backward pass through two forward passes (their examples would be merged by position);
- a hooked module run outside a forward pass of the model the optimizer was built with (such passes
  go uncounted), or whose dimension 0 is not that pass's batch (a reshaped or transposed batch:
  its rows are parts of examples);
- reentrant gradient checkpointing (its nested backward passes would clip each segment alone);
  non-reentrant checkpointing works.
Per-example tensors left by a backward pass that failed are discarded, never merged.

The non-private gradient autograd accumulates in each trained parameter's `.grad` is dropped
as soon as it lands (a post-accumulate hook), so nothing downstream (gradient-norm logging,
a trainer's own clipping) can read or publish it; the hook only notes that it arrived.

A constant factor c applied to the loss after the per-example losses were summed (a trainer's
division by the gradient-accumulation steps, a loss scaler) reaches every per-example gradient.
`watch_loss(loss)` measures c as the gradient arriving at `loss` and divides it out, so each
example's gradient is exactly that of its own loss whatever the training loop does to the sum.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import kernels
from .clipping import clip_factors

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
    """

    def __init__(self, name: str, params: Sequence[Tensor], per_example: PerExampleFn,
                 sqnorms: Callable[..., Tensor], compute_dtype: torch.dtype, clip_scale: float = 1.0):
        self.name = name
        self.params = list(params)
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

    def reset(self) -> None:
        self.pending = self.pending_sqnorms = None
        self.pending_key = None
        self.sums = None
        self.gradient_arrived = False
        self.gradient_task = None


MAIN_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """Dimension 0 of a model's main input: its first positional tensor, else the first Hugging Face
    input named in MAIN_INPUTS, else its first keyword tensor (e.g. `past_values`); None without
    any tensor input."""
    named = (kwargs.get(name) for name in MAIN_INPUTS)
    for value in (*args, *named, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


class StepStats:
    """Counters of the current logical step (for monitoring; not privacy-relevant)."""

    def __init__(self):
        self.examples = 0
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


class PerExampleCollector:
    """Attaches the hooks, clips per backward pass and owns the step's accumulators.

    Args:
        max_grad_norm: the global clipping bound C.
        loss_reduction: "sum" if the loss is a sum of per-example losses, "mean" if it is
            their mean over the micro-batch (gradients are then multiplied by b).
    """

    def __init__(self, max_grad_norm: float, loss_reduction: str):
        self.max_grad_norm = max_grad_norm
        self.loss_reduction = loss_reduction
        self.units: list[Unit] = []
        self.stats = StepStats()
        self._handles: list = []
        self._queued_task: int | None = None
        self._forward_pass = 0
        self._root_depth = 0  # > 0 inside a forward pass of the model the optimizer was built with
        self._forward_batch: int | None = None
        self._loss_scales: dict[int, Tensor] = {}
        self._paused = False

    @contextlib.contextmanager
    def paused(self):
        """Forward passes inside are not watched: no per-example tensors, no clipping (for prism.probe)."""
        self._paused, was = True, self._paused
        try:
            yield
        finally:
            self._paused = was

    def count_forward_passes(self, model: nn.Module) -> None:
        """Number the forward passes of `model` (its root), so examples of different passes never mix,
        and note each pass's batch size (dimension 0 of its main input) to check every hooked module
        against: a module whose dimension 0 is not the examples would clip rows, not examples."""

        def before(module, args, kwargs):
            self._forward_pass += 1
            self._root_depth += 1
            self._forward_batch = _batch_size(args, kwargs)

        def after(module, args, kwargs, output):
            self._root_depth -= 1

        self._handles += [model.register_forward_pre_hook(before, with_kwargs=True),
                          model.register_forward_hook(after, with_kwargs=True, always_call=True)]

    def add_lora_pair(self, lora_A: nn.Linear, lora_B: nn.Linear, unit: Unit) -> None:
        """Hook a LoRA pair; `unit.per_example(x, h, go)` gets lora_A's input x, its output h
        and the gradient go at lora_B's output."""
        def on_lora_A(module, inputs, output):
            # kept on lora_A's output (lora_B's input), so it lives exactly as long as that tensor:
            # a recomputation that stops before lora_B (non-reentrant checkpointing) leaves nothing behind
            output._prism_lora_input = inputs[0]

        def on_lora_B(module, inputs, output):
            if output.requires_grad:
                x = getattr(inputs[0], "_prism_lora_input", None)
                if x is None:
                    raise RuntimeError(f"{unit.name}: lora_B was called on something other than lora_A's output; "
                                       "prism supports peft's standard LoRA forward only.")
                self._watch(output, unit, x, inputs[0])

        self._add_unit(unit)
        self._handles += [lora_A.register_forward_hook(on_lora_A), lora_B.register_forward_hook(on_lora_B)]

    def add_linear(self, module: nn.Linear, unit: Unit) -> None:
        """Hook a dense nn.Linear; `unit.per_example(x, go)` gets its input and output gradient."""

        def on_forward(mod, inputs, output):
            if output.requires_grad:
                self._watch(output, unit, inputs[0])

        self._add_unit(unit)
        self._handles.append(module.register_forward_hook(on_forward))

    def _add_unit(self, unit: Unit) -> None:
        """Register the unit and drop the non-private gradient of its parameters as it lands."""

        def drop_gradient(param: Tensor) -> None:
            unit.gradient_arrived = True
            unit.gradient_task = torch._C._current_graph_task_id()
            self._finish_at_the_end_of(unit.gradient_task)
            param.grad = None

        self.units.append(unit)
        self._handles += [p.register_post_accumulate_grad_hook(drop_gradient) for p in unit.params]

    def watch_loss(self, loss: Tensor) -> None:
        """Divide out any constant factor the training loop applies to `loss` before backward."""
        if not loss.requires_grad:
            return
        if loss.dim() != 0:
            raise ValueError(f"watch_loss needs the scalar loss, got shape {tuple(loss.shape)}")

        def on_loss_grad(grad: Tensor) -> None:
            if not bool(torch.isfinite(grad)) or float(grad) == 0:
                raise RuntimeError(f"the loss's gradient was scaled by {float(grad)}; prism cannot recover each "
                                   "example's gradient. Do not scale the loss by zero or a non-finite factor.")
            self._loss_scales[torch._C._current_graph_task_id()] = grad.detach()

        loss.register_hook(on_loss_grad)

    def _watch(self, output: Tensor, unit: Unit, *captured: Tensor) -> None:
        if self._paused:
            return
        captured_box = [captured]
        forward_pass = self._forward_pass
        recomputed_in_backward = torch._C._current_graph_task_id() != -1
        if not recomputed_in_backward:
            self._check_rows_are_examples(unit, output)

        def on_grad(grad: Tensor):
            if recomputed_in_backward:
                raise RuntimeError(
                    "reentrant gradient checkpointing runs nested backward passes, which would clip each "
                    "checkpointed segment on its own. Use non-reentrant checkpointing: model."
                    "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}).")
            if captured_box[0] is None:
                raise RuntimeError(
                    "a gradient reached the same forward pass twice (backward called twice, e.g. with "
                    "retain_graph=True); each example would count twice. Sum the losses and call "
                    "backward once per forward pass.")
            inputs, captured_box[0] = captured_box[0], None
            self._on_grad(unit, inputs, grad, forward_pass)

        output.register_hook(on_grad)

    def _check_rows_are_examples(self, unit: Unit, output: Tensor) -> None:
        if self._root_depth == 0:
            raise RuntimeError(
                f"{unit.name} ran outside a forward pass of the model the optimizer was built with (through "
                "model.get_base_model(), a submodule or a copy?). prism numbers the forward passes of that model "
                "to keep their examples apart; call the model you gave the optimizer.")
        if self._forward_batch is not None and output.shape[0] != self._forward_batch:
            raise RuntimeError(
                f"{unit.name} has {output.shape[0]} rows on dimension 0, but this forward pass got a batch of "
                f"{self._forward_batch} examples. The model reshapes or transposes the batch before this module "
                "(multiple-choice heads, flattened tokens, channels or windows as rows, sequence-first attention, or the "
                "module also runs on shared inputs such as relative-position embeddings), so its rows are not examples "
                "and clipping them would not bound each example's gradient. Leave it out of target_modules / "
                "modules_to_save.")

    def _on_grad(self, unit: Unit, inputs: tuple[Tensor, ...], grad: Tensor, forward_pass: int) -> None:
        task = torch._C._current_graph_task_id()
        self._finish_at_the_end_of(task)
        b = grad.shape[0]
        tensors = [t.reshape(b, -1, t.shape[-1]) for t in (*inputs, grad)]
        grad_scale = b if self.loss_reduction == "mean" else 1
        if task in self._loss_scales:
            grad_scale = grad_scale / self._loss_scales[task].to(unit.compute_dtype)
        with torch.no_grad():
            per_example, sqnorms = unit.per_example(*tensors, grad_scale=grad_scale)
            unit.add_pending(per_example, sqnorms, (task, forward_pass))

    def _finish_at_the_end_of(self, task: int) -> None:
        if self._queued_task != task:
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self.finish_backward(task))
            self._queued_task = task

    @torch.no_grad()
    def finish_backward(self, task: int) -> None:
        """Clip the examples of the finished backward pass `task` by their global norm and accumulate."""
        self._queued_task = None
        self._loss_scales.pop(task, None)
        active = [u for u in self.units if u.pending is not None and u.pending_key[0] == task]
        unseen = [u.name for u in self.units if u.gradient_task == task and u not in active]
        if unseen:
            raise RuntimeError(
                f"{', '.join(unseen)}: the parameters got a gradient in this backward pass that prism's per-example "
                "hooks never saw. The model changed the module's output in place (e.g. hidden[~mask] = 0), which "
                "detaches the hook, or used its weights outside the module's forward call. That gradient cannot be "
                "clipped per example: leave the module out of target_modules / modules_to_save.")
        if not active:
            return
        sizes = {u.pending[0].shape[0] for u in active}
        if len(sizes) != 1:
            raise RuntimeError(f"hooked modules saw different batch sizes {sorted(sizes)} in one backward pass; "
                               "prism needs the batch on dimension 0 of every LoRA and head input.")
        sqnorms = sum(u.pending_norms() for u in active)
        alpha, finite = clip_factors(sqnorms, self.max_grad_norm)
        for u in active:
            u.flush(alpha, finite)
        self.stats.examples += sizes.pop()
        self.stats.count(alpha, finite)
        self.stats.backward_passes += 1
        self.stats.last_norms = sqnorms.sqrt()

    def discard_unfinished(self) -> None:
        """Drop per-example tensors of backward passes that never finished (e.g. raised midway)."""
        for u in self.units:
            if u.pending is not None:
                warnings.warn(f"{u.name}: discarding per-example gradients of a backward pass that did not finish",
                              RuntimeWarning, stacklevel=3)
                u.pending = None

    def reset(self) -> None:
        """Forget everything accumulated since the last step."""
        for u in self.units:
            u.reset()
        self.stats = StepStats()
        self._queued_task = None
        self._loss_scales.clear()

    @property
    def hooked(self) -> bool:
        """Whether the hooks are still attached to the model."""
        return bool(self._handles)

    def remove(self) -> None:
        """Detach every hook from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
