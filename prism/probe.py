"""A one-off check, on a real batch, that every trained module's rows are the batch's examples.

prism clips row i of each hooked module's per-example gradient, g_i = x_i^T dL/dy_i summed over
the module's calls (x its input, y its output, L = sum_j loss_j). That bounds example i's
influence only if row i depends on example i alone:
- backward: loss_j reaches no row but its own, dloss_j/dy_i = 0 for j != i, so that
  dL/dy_i = dloss_i/dy_i;
- forward: x_i, y_i and loss_i do not change when another example changes.
The hooks check row COUNTS on every pass (hooks.py); layouts whose rows are not examples but whose
count equals the batch (LoRA in a text tower fed fixed class prompts, two images in one example
and none in another, mixture-of-experts experts that get exactly b tokens, a sequence-first input)
and models that mix examples (BatchNorm in training mode, in-batch negatives in the loss) pass
that check. This probe tests the two conditions above directly:
- backward: for a few examples j, the gradient of loss_j alone w.r.t. every hooked output must be
  exactly zero on every other row (unconnected rows get exact zeros);
- padding: a batch with an attention_mask padded on one side gets one more padding column there
  (each sequence field extended with a padded row's value at that edge); in eval mode (no
  dropout), every loss must stay the same to 1e-4 (fp32). The padded length is the batch's
  longest example, so a loss that moves with it depends on other examples: absolute positions
  counted from the start of a left-padded row (GPT-2 without position_ids), a causal LM loss that
  predicts the first token from left padding (only when the example is not the longest), a mean
  over padded positions.
- forward: with the same random state (dropout; torch, numpy and Python generators), the LAST
  example is replaced by a copy of another one (the first, and the one whose loss differs most);
  every hooked input and output, and every loss, must keep its other rows (to a few units of
  rounding of each row). Changing the last example keeps random draws made example by example
  (SpecAugment's masks) the same for the others.
It is a test on one batch, not a proof: a layout that only sometimes breaks the rules (by chance
row counts, a batch-level statistic that the replaced example happens not to move) is caught
only on batches where it shows. It changes nothing: parameters get no gradient, buffers
(BatchNorm statistics) and the global random states are restored.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

PerExampleLossOfBatch = Callable[[nn.Module, object], Tensor]

PROBE_SEED = 0
ROUNDING_UNITS = 8  # forward rows count as unchanged within this many units of rounding of the row's scale

_NOT_EXAMPLES = ("Clipping its rows would not bound one example's gradient: leave the module out of target_modules / "
                 "modules_to_save, or make each example's loss depend on that example alone.")
_SHARED_FIELD_HINT = ("(The probe changes every batch field with b rows. If such a field is shared by all examples, "
                      "e.g. b class prompts, this is a false alarm: check it, then skip the probe.)")


class RowsAreNotExamples(RuntimeError):
    """A trained module's rows are not the batch's examples, so per-row clipping is not per-example."""


class _Captured:
    """Inputs and outputs of the watched modules' calls during one forward pass, in call order."""

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]):
        self.calls: list[tuple[str, Tensor, Tensor]] = []
        self.recording = True
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules]

    def _hook(self, name: str):
        def record(module, inputs, output):
            if self.recording and torch.is_tensor(output) and inputs and torch.is_tensor(inputs[0]):
                self.calls.append((name, inputs[0], output))
        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def check_rows_are_examples(model: nn.Module, modules: Sequence[tuple[str, nn.Module]], batch,
                            per_example_loss: PerExampleLossOfBatch, *, probes: int = 8) -> None:
    """Raise RowsAreNotExamples if a watched module's rows are not the examples of `batch`.

    Args:
        model: the model, called by `per_example_loss` (probed in its current train / eval mode).
        modules: (name, module) pairs whose input and output rows must be examples (LoRA pairs:
            lora_A, whose input the hooks keep, and lora_B, whose output gradient they use).
        batch: a batch of >= 2 examples, in the form `per_example_loss` takes.
        per_example_loss: (model, batch) -> (b,) losses, as used for training.
        probes: how many examples' losses are back-propagated on their own (spread evenly, first
            and last included).
    """
    if not model.training:
        warnings.warn("the model is in eval mode, so the probe checks it as it runs in eval mode (BatchNorm uses "
                      "its running statistics); call model.train() first if it trains in train mode.",
                      UserWarning, stacklevel=3)
    with _restored_buffers(model):
        captured = _Captured(modules)
        try:
            with torch.enable_grad():  # also when called under no_grad
                with _fixed_random_state(model):
                    losses = per_example_loss(model, batch)
                captured.recording = False
                b = _check_losses(losses)
                _check_row_counts(captured.calls, b)
                _check_backward(captured.calls, losses, _probed_examples(b, probes))
            sources = _replacement_sources(losses.detach())
            del losses
            captured.calls, captured.recording = [], True
            with torch.no_grad():
                unchanged = _forward(model, batch, per_example_loss, captured, torch.arange(b))
                for source in sources:
                    changed = _forward(model, batch, per_example_loss, captured,
                                       torch.cat([torch.arange(b - 1), torch.tensor([source])]))
                    _compare_forward(unchanged, changed)
                captured.recording = False
                _check_padding(model, batch, per_example_loss, b)
        finally:
            captured.remove()


def _check_losses(losses) -> int:
    if not torch.is_tensor(losses) or losses.dim() != 1:
        raise ValueError(f"per_example_loss must return a (b,) tensor of per-example losses, got "
                         f"{tuple(losses.shape) if torch.is_tensor(losses) else type(losses).__name__}.")
    if losses.shape[0] < 2:
        raise ValueError(f"checking that rows are examples needs a batch of at least 2 examples, got {losses.shape[0]}.")
    return losses.shape[0]


def _check_row_counts(calls, b: int) -> None:
    for name, x, y in calls:
        if y.shape[0] != b:
            raise RowsAreNotExamples(f"{name} has {y.shape[0]} rows on dimension 0 but the loss has {b} examples, so "
                                     f"its rows are not examples. {_NOT_EXAMPLES}")


def _probed_examples(b: int, probes: int) -> list[int]:
    """`probes` examples spread evenly from the first to the last (all of them if probes >= b)."""
    n = max(1, min(probes, b))
    return sorted({round(k * (b - 1) / max(1, n - 1)) for k in range(n)})


def _check_backward(calls, losses: Tensor, examples: list[int]) -> None:
    outputs = [(name, y) for name, _, y in calls if y.requires_grad]
    if calls and not outputs:
        raise RuntimeError("no trained module's output requires a gradient in the probe's forward pass (reentrant "
                           "gradient checkpointing runs it without gradients), so rows cannot be traced; use "
                           "non-reentrant checkpointing (use_reentrant=False).")
    for j in examples:
        if not losses[j].requires_grad:
            continue
        grads = torch.autograd.grad(losses[j], [y for _, y in outputs], retain_graph=True, allow_unused=True)
        for (name, y), g in zip(outputs, grads):
            if g is None:
                continue
            reached = g.reshape(g.shape[0], -1).ne(0).any(1)
            reached[j] = False
            if reached.any():
                rows = reached.nonzero().flatten().tolist()
                raise RowsAreNotExamples(
                    f"{name}: the loss of example {j} reaches row(s) {_few(rows)} of this module, not only row {j}. "
                    "Its rows are not examples (a tower fed inputs shared by the batch such as fixed class prompts, "
                    "several images per example, mixture-of-experts experts), or the loss mixes examples (in-batch "
                    f"negatives, normalisation over the batch). {_NOT_EXAMPLES}")


def _replacement_sources(losses: Tensor) -> list[int]:
    """Examples to copy over the last one: the first, and the one whose loss differs most from the last's."""
    b = losses.shape[0]
    farthest = int((losses[:b - 1].double() - losses[b - 1].double()).abs().nan_to_num(0.0).argmax())
    return sorted({0, farthest})


def _forward(model: nn.Module, batch, per_example_loss: PerExampleLossOfBatch, captured: _Captured,
             index: Tensor) -> tuple[list, Tensor]:
    """(the watched calls, the losses) of the batch with its examples taken in the order `index`."""
    captured.calls = []
    with _fixed_random_state(model):
        losses = per_example_loss(model, replace_examples(batch, index, index.shape[0]))
    return captured.calls, losses


def _compare_forward(unchanged: tuple[list, Tensor], changed: tuple[list, Tensor]) -> None:
    """Every row but the last (the replaced example) must be the same in both runs."""
    (before, losses_before), (after, losses_after) = unchanged, changed
    last = losses_before.shape[0] - 1
    if _call_shapes(before) == _call_shapes(after):  # else the calls depend on the data (routing): see backward
        for (name, x0, y0), (_, x1, y1) in zip(before, after):
            for what, t0, t1 in (("input", x0, x1), ("output", y0, y1)):
                rows = _changed_rows(t0, t1)
                if rows:
                    raise RowsAreNotExamples(
                        f"{name}: changing example {last} changed row(s) {_few(rows)} of this module's {what}: "
                        "the model mixes examples before or inside it (BatchNorm in training mode, statistics or "
                        f"memory shared across the batch). {_NOT_EXAMPLES} {_SHARED_FIELD_HINT}")
    rows = _changed_rows(losses_before, losses_after)
    if rows:
        raise RowsAreNotExamples(
            f"changing example {last} changed the loss of example(s) {_few(rows)}: the model or the loss mixes "
            "examples in the forward pass (BatchNorm in training mode, statistics over the batch such as a "
            f"normaliser counted over all examples). Each example's loss must depend on that example alone. "
            f"{_SHARED_FIELD_HINT}")


PADDING_TOLERANCE = 1e-4  # relative change of a loss allowed when the batch gets one more padding column (fp32)


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

    return type(batch)({key: extend(value) for key, value in batch.items()})


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


def _call_shapes(calls) -> list[tuple]:
    return [(name, x.shape, y.shape) for name, x, y in calls]


def _changed_rows(before: Tensor, after: Tensor) -> list[int]:
    """Rows other than the last that differ by more than ROUNDING_UNITS units of rounding of the row's scale."""
    before, after = before.detach(), after.detach()
    rows_before, rows_after = before.reshape(before.shape[0], -1), after.reshape(after.shape[0], -1)
    if not before.is_floating_point():
        differs = rows_before.ne(rows_after).any(1)
    else:
        scale = torch.maximum(rows_before.abs().amax(1), rows_after.abs().amax(1)).double()
        tolerance = ROUNDING_UNITS * torch.finfo(before.dtype).eps * scale
        differs = (rows_before - rows_after).abs().amax(1).double() > tolerance
        differs |= ~torch.isfinite(rows_after).all(1)
    differs[-1] = False
    return differs.nonzero().flatten().tolist()


def replace_examples(batch, index: Tensor, b: int):
    """`batch` with its examples taken in the order `index`: every tensor (and list of examples) whose
    dimension 0 is b is indexed; other fields (shared inputs, scalars, settings) are kept."""
    if torch.is_tensor(batch):
        return batch[index.to(batch.device)] if batch.dim() > 0 and batch.shape[0] == b else batch
    if isinstance(batch, Mapping):
        return type(batch)({key: replace_examples(value, index, b) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(replace_examples(value, index, b) for value in batch))
    if isinstance(batch, (list, tuple)):
        if len(batch) == b and not any(torch.is_tensor(v) or isinstance(v, (Mapping, list, tuple)) for v in batch):
            return type(batch)(batch[i] for i in index.tolist())
        return type(batch)(replace_examples(value, index, b) for value in batch)
    return batch


@contextlib.contextmanager
def _fixed_random_state(model: nn.Module):
    """The same random draws on every call (dropout, SpecAugment's numpy masks), and the caller's torch,
    numpy and Python random states left as they were."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(PROBE_SEED)
            np.random.seed(PROBE_SEED)
            random.seed(PROBE_SEED)
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def _restored_buffers(model: nn.Module):
    """Put back every buffer (BatchNorm running statistics, counters) the probe's forward passes change."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _few(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:5])) + (f" (and {len(rows) - 5} more)" if len(rows) > 5 else "")
