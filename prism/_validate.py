"""Keyword validators whose errors name the offending argument and how to fix it."""

from __future__ import annotations

import math


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return float(value)


def positive(**kwargs) -> None:
    """Raise unless every value is a finite number > 0."""
    for name, value in kwargs.items():
        if not (0 < _number(name, value) < math.inf):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def non_negative(**kwargs) -> None:
    """Raise unless every value is a finite number >= 0."""
    for name, value in kwargs.items():
        if not (0 <= _number(name, value) < math.inf):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def in_unit_interval(**kwargs) -> None:
    """Raise unless every value lies in [0, 1)."""
    for name, value in kwargs.items():
        if not (0 <= _number(name, value) < 1):
            raise ValueError(f"{name} must lie in [0, 1), got {value!r}")


def one_of(choices, **kwargs) -> None:
    """Raise unless every value is one of `choices`."""
    for name, value in kwargs.items():
        if value not in choices:
            raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
