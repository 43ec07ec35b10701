"""Stage 1, collect: in-place hooks that feed each backward pass to the per-example and clip stages.

The hooks sit on the user's own modules (peft's lora_A / lora_B and dense nn.Linear layers);
the model is never wrapped. For each forward call with gradients enabled they pass the module's
output through an identity autograd function (`_Capture`) that saves what the per-example stage
needs (the inputs of lora_A and lora_B, which autograd saves anyway) as saved tensors: under
non-reentrant gradient checkpointing they are dropped after the forward pass and recomputed in the
backward pass like every other activation, and activation offloading moves them too. When the
output's gradient arrives, `_Capture`'s backward hands (inputs, output gradient) to a `Unit`, which
turns them into per-example tensors (stage 2, pipeline.per_example). At the end of the backward pass the
collector runs the clip stage (pipeline.clip.clip_backward_pass, scheduled by `_schedule_clip`):
each example's GLOBAL norm over all units, its clip factor, and the clipped sums added to each
unit's accumulators; per-example tensors are then dropped. Gradient accumulation
over several micro-batches therefore only ever accumulates clipped sums.

Formal guarantees: per backward pass, every example i of the micro-batch contributes
alpha_i (t_i over all units) with global norm <= max_grad_norm (see pipeline.clip). Refused
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
import weakref

import torch
from torch import Tensor, nn

from .._torch_compat import NOT_IN_BACKWARD, current_backward_pass, queue_end_of_backward
from .clip import clip_backward_pass
from .units import StepStats, Unit

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


_COLLECTORS_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its collectors (WeakSet)


def collectors_of(model: nn.Module) -> list["PerExampleCollector"]:
    """The live collectors (one per prism optimizer) that were attached to `model`."""
    return list(_COLLECTORS_OF.get(model, ()))


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
        """Passes inside are not watched: no per-example tensors, no clipping, no examples counted, and the
        parameters' gradients are dropped (for prism.probe and placeholder passes)."""
        self._paused, was = True, self._paused
        try:
            yield
        finally:
            self._paused = was

    def count_forward_passes(self, model: nn.Module) -> None:
        """Number the forward passes of `model` (its root), so examples of different passes never mix,
        and note each pass's batch size (dimension 0 of its main input) to check every hooked module
        against: a module whose dimension 0 is not the examples would clip rows, not examples."""
        _COLLECTORS_OF.setdefault(model, weakref.WeakSet()).add(self)

        def before(module, args, kwargs):
            self._forward_pass += 1
            self._root_depth += 1
            self._forward_batch = _batch_size(args, kwargs)
            if torch.is_grad_enabled() and not self._paused and self._forward_batch:
                self.stats.forwarded += self._forward_batch

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
                return self._watch(output, unit, x, inputs[0])
            return None

        self._add_unit(unit)
        self._handles += [lora_A.register_forward_hook(on_lora_A), lora_B.register_forward_hook(on_lora_B)]

    def add_linear(self, module: nn.Linear, unit: Unit) -> None:
        """Hook a dense nn.Linear; `unit.per_example(x, go)` gets its input and output gradient."""

        def on_forward(mod, inputs, output):
            return self._watch(output, unit, inputs[0]) if output.requires_grad else None

        self._add_unit(unit)
        self._handles.append(module.register_forward_hook(on_forward))

    def _add_unit(self, unit: Unit) -> None:
        """Register the unit and drop the non-private gradient of its parameters as it lands."""

        def drop_gradient(param: Tensor) -> None:
            if self._paused:  # a pass nothing is recorded of (prism.probe, placeholder passes)
                param.grad = None
                return
            unit.gradient_arrived = True
            unit.gradient_task = current_backward_pass()
            self._schedule_clip(unit.gradient_task)
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
            self._loss_scales[current_backward_pass()] = grad.detach()

        loss.register_hook(on_loss_grad)

    def _watch(self, output: Tensor, unit: Unit, *captured: Tensor) -> Tensor | None:
        """The module's output to return from its forward hook (None: unchanged): routed through `_Capture`,
        whose backward calls on_grad with the captured tensors and the output's gradient."""
        if self._paused:
            return None
        forward_pass = self._forward_pass
        recomputed_in_backward = current_backward_pass() != NOT_IN_BACKWARD
        if not recomputed_in_backward:
            self._check_rows_are_examples(unit, output)
        reached = [False]

        def on_grad(inputs: tuple[Tensor, ...], grad: Tensor | None):
            if recomputed_in_backward:
                raise RuntimeError(
                    "reentrant gradient checkpointing runs nested backward passes, which would clip each "
                    "checkpointed segment on its own. Use non-reentrant checkpointing: model."
                    "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}).")
            if reached[0]:
                raise RuntimeError(
                    "a gradient reached the same forward pass twice (backward called twice, e.g. with "
                    "retain_graph=True); each example would count twice. Sum the losses and call "
                    "backward once per forward pass.")
            reached[0] = True
            self._on_grad(unit, inputs, grad, forward_pass)

        return _Capture.apply(output, on_grad, *captured)

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

    def _on_grad(self, unit: Unit, inputs: tuple[Tensor, ...], grad: Tensor | None, forward_pass: int) -> None:
        if grad is None:
            raise RuntimeError(
                f"{unit.name}: the gradient reaching this module's output is undefined: an operation above it in "
                "the model has no backward, so this module (and everything below it) would silently not train. "
                "A known cause: bitsandbytes' CPU path switches a quantized layer to an inference kernel once it "
                "runs in evaluation mode; load the model again and keep it in training mode (model.train()) "
                "before its first forward pass.")
        task = current_backward_pass()
        self._schedule_clip(task)
        b = grad.shape[0]
        tensors = [t.reshape(b, -1, t.shape[-1]) for t in (*inputs, grad)]
        grad_scale = b if self.loss_reduction == "mean" else 1
        if task in self._loss_scales:
            grad_scale = grad_scale / self._loss_scales[task].to(unit.compute_dtype)
        with torch.no_grad():
            per_example, sqnorms = unit.per_example(*tensors, grad_scale=grad_scale)
            unit.add_pending(per_example, sqnorms, (task, forward_pass))

    def _schedule_clip(self, task: int) -> None:
        """Run the clip stage once, at the end of backward pass `task` (after every module's gradient)."""
        if self._queued_task != task:
            queue_end_of_backward(lambda: self._clip_finished_backward(task))
            self._queued_task = task

    def _clip_finished_backward(self, task: int) -> None:
        self._queued_task = None
        self._loss_scales.pop(task, None)
        clip_backward_pass(self.units, task, self.max_grad_norm, self.stats)

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


class _Capture(torch.autograd.Function):
    """Identity on a hooked module's output. Saves `captured` through autograd's saved-tensor machinery (so
    gradient checkpointing recomputes them instead of prism holding them from the forward to the backward
    pass) and, in backward, calls on_grad(captured, gradient of the output) before passing the gradient on.
    An undefined gradient reaches on_grad as None (not as zeros), which it refuses."""

    @staticmethod
    def forward(ctx, output: Tensor, on_grad, *captured: Tensor) -> Tensor:
        ctx.on_grad = on_grad
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*captured)
        # returned as an in-place identity, not a view: a model may write into the output in place
        # (hidden[~mask] = 0), and the gradient reaching backward is then the one of the output itself
        ctx.mark_dirty(output)
        return output

    @staticmethod
    def backward(ctx, grad: Tensor | None):
        saved = ctx.saved_tensors  # once: under checkpointing each unpack recomputes
        ctx.on_grad(saved, grad)
        return (grad, None) + (None,) * len(saved)
