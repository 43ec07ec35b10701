"""The one place that knows kinds of base layers (the frozen layer a peft LoRA layer adapts).

The pipeline itself never looks at the base layer: the per-example blocks need only the LoRA
path's input and output gradient (lora_A's input, lora_B's output), whatever computes W0 x.
What does depend on the base layer's kind is collected in a `BaseKind`:

| field              | meaning                                                                    |
|--------------------|----------------------------------------------------------------------------|
| name               | shown in messages                                                          |
| fan_in_fan_out     | the base weight is stored (in, out) instead of torch's (out, in)           |
| may_rewrite_base   | an init may subtract from the base weight in place (PiSSA-style balance); |
|                    | False for quantized weights, which cannot take a dense update              |
| features(layer)    | (in_features, out_features) of the base layer                              |
| applied_weight(l)  | the dense (out, in) weight the layer applies (dequantized where needed)   |

Adding a kind is one small module in prism/layers/kinds/ that builds its BaseKind and calls
`register_base_kind(layer_type, kind)`, plus one import line in prism/layers/kinds/__init__.py.
A kind from an optional package is registered by the class's import path
("package.module.ClassName") so that prism never imports that package itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn


@dataclass(frozen=True)
class BaseKind:
    """What prism needs to know about one type of base layer (see the module docstring)."""

    name: str
    fan_in_fan_out: bool
    may_rewrite_base: bool
    features: Callable[[nn.Module], tuple[int, int]]
    applied_weight: Callable[[nn.Module], Tensor]

    def weight_delta(self, delta: Tensor) -> Tensor:
        """An (out, in) change of the applied weight, in the orientation the base stores it."""
        return delta.T if self.fan_in_fan_out else delta


_KINDS: dict[type | str, BaseKind] = {}  # a class, or a class's import path "module.QualName"


def register_base_kind(layer_type: type | str, kind: BaseKind) -> None:
    """Make `layer_type` (and its subclasses) a supported base layer with the facts in `kind`.

    Args:
        layer_type: the class, or its import path "module.QualName" (for optional packages).

    Raises:
        ValueError: `layer_type` is already registered.
    """
    if layer_type in _KINDS:
        raise ValueError(f"base layer type {layer_type} is already registered as {_KINDS[layer_type].name}")
    _KINDS[layer_type] = kind


def base_kind_of(base_layer: nn.Module) -> BaseKind | None:
    """The kind registered for the base layer's type (the most derived registered class), or None."""
    for cls in type(base_layer).__mro__:
        for key in (cls, f"{cls.__module__}.{cls.__qualname__}"):
            if key in _KINDS:
                return _KINDS[key]
    return None


def supported_kinds() -> list[str]:
    """Names of the registered kinds, for error messages."""
    return sorted({kind.name for kind in _KINDS.values()})
