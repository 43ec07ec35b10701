"""What a peft model trains (discovery) and what prism knows about the layers under it (registry)."""

from . import kinds  # noqa: F401  (registers the supported base-layer kinds)
from .discovery import DenseLinear, LoRAPair, find_trainables
from .registry import BaseKind, base_kind_of, register_base_kind, supported_kinds

__all__ = ["DenseLinear", "LoRAPair", "find_trainables", "BaseKind", "base_kind_of", "register_base_kind",
           "supported_kinds"]
