"""Logical batches as data: an empty draw's placeholder, the collate wrapper that makes it, and
cutting or re-indexing a batch along its example axis (whatever its nesting: tensors, numpy
arrays, lists of examples, mappings, tuples and namedtuples of fields).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Iterator

import numpy as np
import torch


class EmptyBatch:
    """An empty Poisson batch: length 0, `micro_batches` yields nothing from it, and any attempt to
    use it as data fails loudly. The step must still happen (`optimizer.step()` adds the noise)."""

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "EmptyBatch()"


class EmptySafeCollate:
    """A collate_fn for Poisson draws, which may be empty: `collate_fn(examples)` for a non-empty
    list, `empty()` for an empty one (which reads no example and never reaches `collate_fn`).

    Args:
        collate_fn: the collator of the loader or Trainer.
        empty: what an empty batch becomes (default: `EmptyBatch()`; the Trainer integration
            makes it a marker batch its loss recognises).
        count_key: when given, every collated batch (a mapping) also holds, under this key, the
            number of examples it was made from, so that the loss can check that the collator
            kept one row per example.
    """

    def __init__(self, collate_fn: Callable, empty: Callable[[], object] = EmptyBatch, count_key: str | None = None):
        self.collate_fn = collate_fn
        self.empty = empty
        self.count_key = count_key

    def __call__(self, examples: list):
        if not examples:
            return self.empty()
        batch = self.collate_fn(examples)
        if self.count_key is not None:
            batch[self.count_key] = torch.tensor(len(examples))
        return batch


def _is_field_container(batch) -> bool:
    """A list/tuple of fields (tensors or nested structures, as default_collate returns), as opposed to a
    list of examples (strings, numpy arrays, numbers: what an identity collate_fn returns)."""
    return isinstance(batch, (list, tuple)) and len(batch) > 0 and all(
        torch.is_tensor(v) or isinstance(v, (Mapping, list, tuple)) for v in batch)


def batch_size_of(batch) -> int:
    """Number of examples in a (possibly nested) batch: the leading size of its first tensor or numpy
    array (or the length of a list of examples, e.g. raw strings)."""
    if isinstance(batch, EmptyBatch):
        return 0
    if torch.is_tensor(batch) or isinstance(batch, np.ndarray):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return batch_size_of(next(iter(batch.values())))
    if _is_field_container(batch) or (isinstance(batch, tuple) and hasattr(batch, "_fields")):
        return batch_size_of(batch[0])
    if isinstance(batch, (list, tuple)):
        return len(batch)
    raise TypeError(f"cannot find the batch dimension of a {type(batch).__name__}")


def like(mapping: Mapping, items: dict) -> Mapping:
    """A mapping of `mapping`'s type holding `items` (dict, BatchEncoding, ...; types whose constructor
    takes other arguments, such as defaultdict, are copied and updated)."""
    try:
        return type(mapping)(items)
    except TypeError:
        result = copy.copy(mapping)
        result.clear()
        result.update(items)
        return result


def replace_examples(batch, index: torch.Tensor, b: int):
    """`batch` with its examples taken in the order `index`: every tensor or numpy array whose
    dimension 0 is b is indexed, and so is a list (or tuple) of b examples; other fields (shared
    inputs, scalars, settings) are kept. A list whose items all have b rows is a list of fields
    (what default_collate returns), not of examples, unless its items are dicts (records).

    Raises:
        ValueError: nothing in the batch has b rows, so no example could be replaced.
    """
    replaced = 0

    def take(field):
        nonlocal replaced
        if isinstance(field, (list, tuple)):
            replaced += 1
            return type(field)(field[i] for i in index.tolist())
        if (torch.is_tensor(field) or isinstance(field, np.ndarray)) and field.ndim > 0 and field.shape[0] == b:
            replaced += 1
            return field[index.to(field.device)] if torch.is_tensor(field) else field[index.numpy()]
        return field

    def holds_examples(items) -> bool:
        records = all(isinstance(item, Mapping) for item in items)  # a list of dicts is one dict per example
        return len(items) == b and (records or not all(_has_rows(item, b) for item in items))

    result = _rebuild(batch, take, holds_examples)
    if not replaced:
        raise ValueError(f"cannot find the {b} examples in this {type(batch).__name__} batch: no tensor, array or list "
                         f"in it has {b} rows. Pass the batch as the loss function takes it, with the examples on "
                         "dimension 0.")
    return result


def _has_rows(value, b: int) -> bool:
    """Whether `value` is a field of a batch of b: a tensor / array with b rows, or a list of such."""
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        return value.ndim > 0 and value.shape[0] == b
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(_has_rows(item, b) for item in value)
    return False


def micro_batches(batch, max_size: int) -> Iterator:
    """Split a logical batch along its example axis into pieces of at most `max_size` examples.

    Tensors and numpy arrays are cut on dim 0, lists of examples (e.g. strings) by position; mappings
    (dict, Hugging Face BatchEncoding), tuples, lists and namedtuples of fields are cut field by field.
    A list of tensors is a list of fields (default_collate's convention), so per-example tensors must be
    stacked or padded into one tensor first. An `EmptyBatch` yields nothing. Fields whose size disagrees
    with the batch raise.
    """
    if not isinstance(max_size, int) or max_size <= 0:
        raise ValueError(f"max_size must be an integer > 0, got {max_size!r}")
    size = batch_size_of(batch)

    def cut(field, index: slice):
        if not (torch.is_tensor(field) or isinstance(field, (np.ndarray, list, tuple))):
            raise TypeError(f"micro_batches cannot split a {type(field).__name__} field")
        if len(field) != size:
            raise ValueError(f"a batch field has {len(field)} entries but the batch has {size} examples; "
                             "micro_batches needs every field on the example axis")
        return field[index]

    for start in range(0, size, max_size):
        index = slice(start, min(start + max_size, size))
        yield _rebuild(batch, lambda field: cut(field, index), lambda items: not _is_field_container(items))


def _rebuild(value, leaf: Callable, holds_examples: Callable[[list | tuple], bool]):
    """`value` with `leaf` applied to each field: each tensor, numpy array, list (or tuple) for which
    `holds_examples` is true, and anything else that is not a container. Mappings (rebuilt with their
    own type), namedtuples and the other lists and tuples are walked into."""
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        return leaf(value)
    if isinstance(value, Mapping):
        return like(value, {key: _rebuild(item, leaf, holds_examples) for key, item in value.items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_rebuild(item, leaf, holds_examples) for item in value))
    if isinstance(value, (list, tuple)) and not holds_examples(value):
        return type(value)(_rebuild(item, leaf, holds_examples) for item in value)
    return leaf(value)
