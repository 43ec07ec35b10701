"""A one-off check, on a real batch, that every trained module's rows are the batch's examples.

prism clips row i of each hooked module's per-example gradient, g_i = x_i^T dL/dy_i summed over
the module's calls (x its input, y its output, L = sum_j loss_j). That bounds example i's
influence only if row i depends on example i alone:
- backward: loss_j reaches no row but its own, dloss_j/dy_i = 0 for j != i, so that
  dL/dy_i = dloss_i/dy_i;
- forward: x_i, y_i and loss_i do not change when another example changes.
The hooks check row COUNTS on every pass (pipeline/collect.py); layouts whose rows are not examples but whose
count equals the batch (LoRA in a text tower fed fixed class prompts, two images in one example
and none in another, mixture-of-experts experts that get exactly b tokens, a sequence-first input)
and models that mix examples (BatchNorm in training mode, in-batch negatives in the loss) pass
that check. This probe tests the two conditions above directly:
- backward: for up to 4 examples j (spread from the first to the last), the gradient of loss_j alone must reach no row of any hooked
  output but row j (unconnected rows get exact zeros);
- padding: a batch with an attention_mask padded on one side gets one more padding column there
  (each sequence field extended with a padded row's value at that edge); in eval mode (no
  dropout), every loss must stay the same to 1e-4 (fp32). The padded length is the batch's
  longest example, so a loss that moves with it depends on other examples: absolute positions
  counted from the start of a left-padded row (GPT-2 without position_ids), a causal LM loss that
  predicts the first token from left padding (only when the example is not the longest), a mean
  over padded positions.
- forward: with the same random state (dropout; torch, numpy and Python generators) and one
  attention kernel (PyTorch's math SDPA, whatever the padding), the LAST example is replaced by a
  copy of the example whose loss differs most from its own; every hooked input and
  output, and every loss, must keep its other rows to ROUNDING_UNITS units of rounding of each
  row, in the coarser of the tensor's and the model's compute precision (bf16 autocast: about 6 %,
  so smaller mixing passes there). Changing the last example keeps random draws made example by
  example (SpecAugment's masks) the same for the others.
It is a test on one batch, not a proof: a layout that only sometimes breaks the rules (by chance
row counts, a batch-level statistic that the replaced example happens not to move) is caught
only on batches where it shows. It changes nothing: parameters get no gradient, buffers
(BatchNorm statistics) and the global random states are restored. Memory: about one training
forward and backward pass on the device (hooked outputs are not kept: the backward probe records
which rows a gradient reaches as it passes); the unchanged pass's hooked tensors are kept on the
CPU for the comparison.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .sampling import like, replace_examples

PerExampleLossOfBatch = Callable[[nn.Module, object], Tensor]
Watched = tuple[str, nn.Module, str]  # (name, module, "input" or "output": the tensor whose rows must be examples)

PROBE_SEED = 0
ROUNDING_UNITS = 8  # forward rows count as unchanged within this many units of rounding of the row's scale
PADDING_TOLERANCE = 1e-4  # relative change of a loss allowed when the batch gets one more padding column (fp32)

_NOT_EXAMPLES = ("Clipping its rows would not bound one example's gradient: leave the module out of target_modules / "
                 "modules_to_save, or make each example's loss depend on that example alone.")
_SHARED_FIELD_HINT = ("(The probe changes every batch field with b rows. If such a field is shared by all examples, "
                      "e.g. b class prompts, this is a false alarm: check it, then skip the probe.)")


class RowsAreNotExamples(RuntimeError):
    """A trained module's rows are not the batch's examples, so per-row clipping is not per-example."""


def check_rows_are_examples(model: nn.Module, params: Sequence[Tensor], watched: Sequence[Watched], batch,
                            per_example_loss: PerExampleLossOfBatch, *, probes: int = 4) -> None:
    """Raise RowsAreNotExamples if a watched module's rows are not the examples of `batch`.

    Args:
        model: the model, called by `per_example_loss` (probed in its current train / eval mode).
        params: the trained parameters (the probe's gradients are taken w.r.t. them, never stored).
        watched: (name, module, "input" | "output"): the tensors whose rows must be examples (LoRA
            pairs: lora_A's input, which the hooks keep, and lora_B's output, whose gradient they use;
            dense layers: both). Gradients are traced through the "output" ones.
        batch: a batch of >= 2 examples, in the form `per_example_loss` takes.
        per_example_loss: (model, batch) -> (b,) losses, as used for training.
        probes: how many examples' losses are back-propagated on their own (spread evenly, first
            and last included).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("check_examples needs gradients: call it outside torch.inference_mode().")
    if not model.training:
        warnings.warn("the model is in eval mode, so the probe checks it as it runs in eval mode (BatchNorm uses "
                      "its running statistics); call model.train() first if it trains in train mode.",
                      UserWarning, stacklevel=3)
    recorder = _Recorder(watched)
    try:
        with _restored_buffers(model):
            with torch.enable_grad():  # also when called under no_grad
                recorder.mode = "trace"
                with _fixed_random_state(model):
                    losses = per_example_loss(model, batch)
                recorder.mode = None
                b = _check_losses(losses)
                recorder.check_row_counts(b)
                _check_backward(recorder, losses, params, _probed_examples(b, probes))
            source = _replacement_source(losses.detach())
            del losses
            recorder.tolerance = ROUNDING_UNITS * _compute_eps(model)
            with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
                unchanged = _forward(model, batch, per_example_loss, recorder, "store", torch.arange(b))
                changed = _forward(model, batch, per_example_loss, recorder, "compare",
                                   torch.cat([torch.arange(b - 1), torch.tensor([source])]))
                _compare_losses(unchanged, changed, recorder.tolerance)
                _check_padding(model, batch, per_example_loss, b)
    finally:
        recorder.remove()


class _Recorder:
    """Forward hooks on the watched modules; what they do depends on `mode`:
    - "trace": note each call's row count, and hook each "output" that requires a gradient so that a
      backward pass records which of its rows the gradient reaches (`reached`);
    - "store": keep a CPU copy of each watched tensor, in call order;
    - "compare": compare each watched tensor as it arrives with the stored one of the same call
      (rows other than the last), and raise at the first changed row;
    - None: nothing."""

    def __init__(self, watched: Sequence[Watched]):
        self.mode: str | None = None
        self.row_counts: list[tuple[str, int]] = []
        self.traced = 0
        self.reached: list[tuple[str, Tensor]] = []
        self.stored: list[tuple[str, Tensor]] = []
        self.position = 0
        self.aligned = True
        self.tolerance = 0.0
        self._handles = [module.register_forward_hook(self._hook(name, kind)) for name, module, kind in watched]

    def _hook(self, name: str, kind: str):
        def on_forward(module, inputs, output):
            tensor = output if kind == "output" else (inputs[0] if inputs else None)
            if self.mode is None or not torch.is_tensor(tensor):
                return
            if self.mode == "trace":
                self.row_counts.append((name, tensor.shape[0]))
                if kind == "output" and tensor.requires_grad:
                    self.traced += 1
                    tensor.register_hook(lambda grad: self.reached.append((name, _rows_reached(grad))))
            elif self.mode == "store":
                self.stored.append((name, tensor.detach().to("cpu", copy=True)))
            else:
                self._compare(name, tensor.detach().cpu())
        return on_forward

    def _compare(self, name: str, tensor: Tensor) -> None:
        if not self.aligned:
            return
        if self.position >= len(self.stored) or self.stored[self.position][0] != name or (
                self.stored[self.position][1].shape != tensor.shape):
            self.aligned = False  # the calls depend on the data (routing): the backward probe covers them
            return
        before = self.stored[self.position][1]
        self.position += 1
        rows = _changed_rows(before, tensor, self.tolerance)
        if rows:
            raise RowsAreNotExamples(
                f"{name}: changing example {before.shape[0] - 1} changed row(s) {_few(rows)} of this module's "
                "input or output: the model mixes examples before or inside it (BatchNorm in training mode, "
                f"statistics or memory shared across the batch). {_NOT_EXAMPLES} {_SHARED_FIELD_HINT}")

    def check_row_counts(self, b: int) -> None:
        for name, rows in self.row_counts:
            if rows != b:
                raise RowsAreNotExamples(f"{name} has {rows} rows on dimension 0 but the loss has {b} examples, so "
                                         f"its rows are not examples. {_NOT_EXAMPLES}")
        if self.row_counts and not self.traced:
            raise RuntimeError("no trained module's output requires a gradient in the probe's forward pass (reentrant "
                               "gradient checkpointing runs it without gradients), so rows cannot be traced; use "
                               "non-reentrant checkpointing (use_reentrant=False).")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.stored = []


def _rows_reached(grad: Tensor) -> Tensor:
    """Which rows of a gradient are not exactly zero (non-finite counts as reached)."""
    return grad.detach().reshape(grad.shape[0], -1).ne(0).any(1).cpu()


def _check_losses(losses) -> int:
    if not torch.is_tensor(losses) or losses.dim() != 1:
        raise ValueError(f"per_example_loss must return a (b,) tensor of per-example losses, got "
                         f"{tuple(losses.shape) if torch.is_tensor(losses) else type(losses).__name__}.")
    if losses.shape[0] < 2:
        raise ValueError(f"checking that rows are examples needs a batch of at least 2 examples, got {losses.shape[0]}.")
    return losses.shape[0]


def _probed_examples(b: int, probes: int) -> list[int]:
    """`probes` examples spread evenly from the first to the last (all of them if probes >= b)."""
    n = max(1, min(probes, b))
    return sorted({round(k * (b - 1) / max(1, n - 1)) for k in range(n)})


def _check_backward(recorder: _Recorder, losses: Tensor, params: Sequence[Tensor], examples: list[int]) -> None:
    """Back-propagate each probed example's loss alone; the output hooks record the rows it reaches."""
    params = [p for p in params if p.requires_grad]
    for j in examples:
        if not losses[j].requires_grad:
            continue
        recorder.reached = []
        torch.autograd.grad(losses[j], params, retain_graph=True, allow_unused=True)
        for name, reached in recorder.reached:
            reached[j] = False
            if reached.any():
                raise RowsAreNotExamples(
                    f"{name}: the loss of example {j} reaches row(s) {_few(reached.nonzero().flatten().tolist())} of "
                    f"this module, not only row {j}. Its rows are not examples (a tower fed inputs shared by the "
                    "batch such as fixed class prompts, several images per example, mixture-of-experts experts), or "
                    f"the loss mixes examples (in-batch negatives, normalisation over the batch). {_NOT_EXAMPLES}")
    recorder.reached = []


def _replacement_source(losses: Tensor) -> int:
    """The example to copy over the last one: the one whose loss differs most from the last's."""
    b = losses.shape[0]
    return int((losses[:b - 1].double() - losses[b - 1].double()).abs().nan_to_num(0.0).argmax())


def _forward(model: nn.Module, batch, per_example_loss: PerExampleLossOfBatch, recorder: _Recorder, mode: str,
             index: Tensor) -> Tensor:
    """The losses of the batch with its examples taken in the order `index`, the recorder in `mode`."""
    recorder.mode, recorder.position, recorder.aligned = mode, 0, True
    if mode == "store":
        recorder.stored = []
    try:
        with _fixed_random_state(model):
            return per_example_loss(model, replace_examples(batch, index, index.shape[0])).detach()
    finally:
        recorder.mode = None


def _compare_losses(before: Tensor, after: Tensor, tolerance: float) -> None:
    rows = _changed_rows(before, after, tolerance)
    if rows:
        raise RowsAreNotExamples(
            f"changing example {before.shape[0] - 1} changed the loss of example(s) {_few(rows)}: the model or the "
            "loss mixes examples in the forward pass (BatchNorm in training mode, statistics over the batch such as "
            "a normaliser counted over all examples). Each example's loss must depend on that example alone. "
            f"{_SHARED_FIELD_HINT}")


def _compute_eps(model: nn.Module) -> float:
    """Unit of rounding of the model's compute: its autocast dtype if autocast is on, else its coarsest
    floating-point parameters."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for device_type in {p.device.type for p in model.parameters()}:
        if device_type in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(device_type):
            dtypes.add(torch.get_autocast_dtype(device_type))
    return max((torch.finfo(dtype).eps for dtype in dtypes), default=torch.finfo(torch.float32).eps)


def _changed_rows(before: Tensor, after: Tensor, tolerance: float) -> list[int]:
    """Rows other than the last that differ by more than `tolerance` (relative, at least the tensor's own
    ROUNDING_UNITS units of rounding) times the row's scale."""
    before, after = before.detach().cpu(), after.detach().cpu()
    rows_before, rows_after = before.reshape(before.shape[0], -1), after.reshape(after.shape[0], -1)
    if not before.is_floating_point():
        differs = rows_before.ne(rows_after).any(1)
    else:
        relative = max(tolerance, ROUNDING_UNITS * torch.finfo(before.dtype).eps)
        scale = torch.maximum(rows_before.abs().amax(1), rows_after.abs().amax(1)).double()
        differs = (rows_before.double() - rows_after.double()).abs().amax(1) > relative * scale
        differs |= ~torch.isfinite(rows_after).all(1)
    differs[-1] = False
    return differs.nonzero().flatten().tolist()


def _check_padding(model: nn.Module, batch, per_example_loss: PerExampleLossOfBatch, b: int) -> None:
    """Losses must not move when the batch is padded one column further (see the module docstring)."""
    longer = padded_further(batch, b)
    if longer is None:
        return
    with _eval_mode(model), _fixed_random_state(model):
        before = per_example_loss(model, batch).double()
        after = per_example_loss(model, longer).double()
    dtype = next(model.parameters()).dtype
    tolerance = max(PADDING_TOLERANCE, 16 * torch.finfo(dtype).eps) * before.abs().clamp(min=1.0)
    moved = ((after - before).abs() > tolerance) | ~torch.isfinite(after)
    if moved.any():
        rows = moved.nonzero().flatten().tolist()
        raise RowsAreNotExamples(
            f"one more padding column changed the loss of example(s) {_few(rows)} (by up to "
            f"{float((after - before).abs().max()):.3g}): each example's loss depends on the batch's padded length, "
            "that is on the longest example in the batch. Typical causes, with left padding: absolute positions "
            "counted from the start of the padded row (pass position_ids computed from the attention mask), or a "
            "causal LM loss that predicts an example's first token from the padding before it, but not when the "
            "example is the longest (pad on the right for training); and a loss averaged over padded positions.")


def padded_further(batch, b: int):
    """A mapping batch with an `attention_mask` of shape (b, T) padded on one side, with one more padding
    column on that side: every field whose first two dimensions are (b, T) is extended with the value
    a padded row holds at that edge. None for other batches or without padding."""
    if not isinstance(batch, Mapping) or not torch.is_tensor(batch.get("attention_mask")):
        return None
    mask = batch["attention_mask"]
    if mask.dim() != 2 or mask.shape[0] != b:
        return None
    for edge in (0, -1):
        padded = (mask[:, edge] == 0).nonzero().flatten()
        if len(padded):
            row = int(padded[0])
            break
    else:
        return None

    def extend(value):
        if not torch.is_tensor(value) or value.dim() < 2 or value.shape[:2] != mask.shape:
            return value
        column = value[row:row + 1, edge:edge + 1 if edge == 0 else None].expand(b, 1, *value.shape[2:])
        return torch.cat([column, value] if edge == 0 else [value, column], dim=1)

    return like(batch, {key: extend(value) for key, value in batch.items()})


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every module in eval mode (no dropout), each put back in its own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _fixed_random_state(model: nn.Module):
    """The same random draws on every call (dropout, SpecAugment's numpy masks), and the caller's random
    states left as they were: the CPU's and those of every device of the types the model is on,
    numpy's and Python's. Only those generators are seeded."""
    device_types = sorted({p.device.type for p in model.parameters()} - {"cpu", "meta"})
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=[]))  # the CPU generator
            for device_type in device_types:
                module = torch.get_device_module(device_type)
                stack.enter_context(torch.random.fork_rng(devices=list(range(module.device_count())),
                                                          device_type=device_type))
                module.manual_seed_all(PROBE_SEED)
            torch.default_generator.manual_seed(PROBE_SEED)
            np.random.seed(PROBE_SEED)
            random.seed(PROBE_SEED)
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def _restored_buffers(model: nn.Module):
    """Put back every buffer (BatchNorm running statistics, counters) the probe's forward passes change;
    the copies are kept on the CPU."""
    saved = [(buffer, buffer.detach().to("cpu", copy=True)) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _few(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:5])) + (f" (and {len(rows) - 5} more)" if len(rows) > 5 else "")
