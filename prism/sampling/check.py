"""The statistical guard against accounting for batches that are not Poisson draws at the declared rate."""

from __future__ import annotations

import math
import warnings


class NonPoissonSampling(RuntimeError):
    """The logical batches do not look Poisson-sampled, so the reported epsilon would be wrong."""


class SamplingCheck:
    """Refuses to account for batches that are visibly not Poisson-sampled at the declared rate.

    Poisson batch sizes are Binomial(N, q): mean b = q N, variance v = b (1 - q). Over the last
    WINDOW logical batches (checked when v >= 1) two tests, each with a false-alarm probability
    below about 1e-9 per window, flag
    - fixed-size batches (e.g. DataLoader(batch_size=..., shuffle=True), short last batches
      included): one size repeats more often than a Binomial's largest probability
      (about 1/sqrt(2 pi v)) allows;
    - a different rate: the mean size is more than 6 standard errors from b.
    With allow_non_poisson=True the check is off and a warning says the epsilon is not a guarantee.
    """

    WINDOW = 40
    ALARM = 1e-9

    def __init__(self, plan, allow_non_poisson: bool):
        self.active = plan.sample_rate is not None and not allow_non_poisson
        rate = plan.sample_rate or 0.0
        self.expected = plan.expected_batch_size
        self.variance = plan.expected_batch_size * (1 - rate)
        self.sizes: list[int] = []
        if allow_non_poisson and plan.sample_rate is not None:
            warnings.warn("allow_non_poisson=True: the reported epsilon assumes Poisson sampling with rate "
                          f"{plan.sample_rate}; for any other sampler it is NOT a valid privacy guarantee.",
                          UserWarning, stacklevel=4)

    def observe(self, batch_size: int) -> None:
        if not self.active or self.variance < 1:
            return
        self.sizes = (self.sizes + [int(batch_size)])[-self.WINDOW:]
        if len(self.sizes) < self.WINDOW:
            return
        repeats = max(self.sizes.count(size) for size in set(self.sizes))
        mean = sum(self.sizes) / self.WINDOW
        if _binomial_tail(self.WINDOW, min(1.0, 1 / math.sqrt(2 * math.pi * self.variance)), repeats) < self.ALARM:
            problem = f"{repeats} of the last {self.WINDOW} logical batches had the same size"
        elif abs(mean - self.expected) > 6 * math.sqrt(self.variance / self.WINDOW):
            problem = (f"the last {self.WINDOW} logical batches averaged {mean:.1f} examples, not the expected "
                       f"{self.expected:.1f}")
        else:
            return
        raise NonPoissonSampling(
            f"{problem}; Poisson sampling at the declared rate would not produce that. The epsilon would be "
            "wrong: draw batches with prism.PoissonBatchSampler / prism.poisson_data_loader at the optimizer's "
            "rate (or pass allow_non_poisson=True to accept an epsilon that is not a guarantee).")

    def state_dict(self) -> dict:
        return {"sizes": list(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        self.sizes = list(state["sizes"])


def _binomial_tail(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) >= k)."""
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))
