"""The one place where noise multiplier, sampling rate, expected batch size and delta meet."""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import _validate
from .accounting import calibrate_noise_multiplier, steps_from, validate_delta, validate_mechanism


@dataclass(frozen=True)
class PrivacyPlan:
    """Resolved privacy settings of an optimizer.

    sample_rate is None when the caller gave neither it nor the dataset size: the optimizer
    then trains privately but cannot account (privacy_spent() raises). steps is the planned
    number of steps (from steps or epochs; None when neither was given).
    """

    noise_multiplier: float
    expected_batch_size: float
    sample_rate: float | None
    delta: float | None
    max_epsilon: float | None
    steps: int | None = None

    def check_dataset_size(self, dataset_size: int, *, what: str = "the dataset") -> None:
        """Raise unless `dataset_size` is the N this plan samples from: N = expected_batch_size / sample_rate.

        The one check, wherever a dataset meets the plan (the optimizer's loader, the Trainer
        integration), that the rate q the accountant composes is expected_batch_size / len(dataset).

        Args:
            dataset_size: the number of examples about to be sampled.
            what: how the error names that dataset (e.g. "train_dataset", "loader.dataset").

        Raises:
            ValueError: the plan has no sampling rate, or was made for another number of examples.
        """
        if self.sample_rate is None:
            raise ValueError(f"the optimizer has no sampling rate, so it cannot sample {what}: build it with "
                             f"dataset_size=len({what}) (or sample_rate).")
        implied = self.expected_batch_size / self.sample_rate
        if not math.isclose(dataset_size, implied, rel_tol=1e-9):
            raise ValueError(f"{what} has {dataset_size} examples but the optimizer was built for {implied:.10g} "
                             f"(expected_batch_size / sample_rate = {self.expected_batch_size:g} / "
                             f"{self.sample_rate:g}), so the accounted rate would be wrong; build the optimizer "
                             f"for this dataset, with dataset_size=len({what}).")


def resolve_plan(*, noise_multiplier=None, target_epsilon=None, delta=None, expected_batch_size=None,
                 sample_rate=None, dataset_size=None, steps=None, epochs=None, max_epsilon=None) -> PrivacyPlan:
    """Check and complete the privacy settings (see PRISM's Args for the rules).

    Raises:
        ValueError: missing, contradictory or out-of-range settings, naming the fix.
    """
    if dataset_size is not None and (not isinstance(dataset_size, int) or dataset_size <= 0):
        raise ValueError(f"dataset_size must be an integer > 0, got {dataset_size!r}")
    if sample_rate is not None:
        validate_mechanism(1.0, sample_rate)
        if dataset_size is not None:
            implied = sample_rate * dataset_size
            if expected_batch_size is not None and not math.isclose(expected_batch_size, implied, rel_tol=1e-6):
                raise ValueError(f"expected_batch_size={expected_batch_size} contradicts sample_rate * dataset_size = "
                                 f"{implied}; give two of the three.")
            expected_batch_size = implied
    elif dataset_size is not None and expected_batch_size is not None:
        _validate.positive(expected_batch_size=expected_batch_size)
        sample_rate = expected_batch_size / dataset_size
        validate_mechanism(1.0, sample_rate)
    if expected_batch_size is None:
        raise ValueError("expected_batch_size is required (or sample_rate and dataset_size, whose product it is).")
    _validate.positive(expected_batch_size=expected_batch_size)
    if delta is not None:
        validate_delta(delta)
        size = dataset_size if dataset_size is not None else (
            None if sample_rate is None else expected_batch_size / sample_rate)
        if size is not None and delta >= 1 / size:
            raise ValueError(f"delta={delta} is >= 1/N = {1 / size:.3g} (N = {size:g} examples, given or implied "
                             "by expected_batch_size / sample_rate), which allows leaking a whole example; use "
                             "delta well below 1/N (e.g. 1e-5 or 1/N^1.1).")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier or target_epsilon.")
    if target_epsilon is not None:
        if sample_rate is None or delta is None:
            raise ValueError("target_epsilon needs delta and the sampling rate (sample_rate, or dataset_size "
                             "with expected_batch_size), and steps or epochs.")
        noise_multiplier = calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps, epochs=epochs)
    _validate.non_negative(noise_multiplier=noise_multiplier)
    if max_epsilon is not None:
        _validate.positive(max_epsilon=max_epsilon)
        if sample_rate is None or delta is None:
            raise ValueError("max_epsilon needs delta and the sampling rate (sample_rate, or dataset_size).")
    planned_steps = None
    if steps is not None or epochs is not None:
        if sample_rate is None and epochs is not None:
            raise ValueError("epochs needs the sampling rate (sample_rate, or dataset_size); or give steps.")
        planned_steps = steps_from(sample_rate if sample_rate is not None else 1.0, steps, epochs)
    return PrivacyPlan(float(noise_multiplier), float(expected_batch_size),
                       None if sample_rate is None else float(sample_rate), delta, max_epsilon, planned_steps)
