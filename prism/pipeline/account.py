"""Stage 8, account: every step is recorded with the accountant; the budget is checked before it.

A step is recorded before its noise is drawn (a noisy gradient enters the optimizer state even if
writing the new parameters is then refused), and also for an empty Poisson batch. The budget
(`max_epsilon`) is enforced before a step is taken: a step that would take epsilon above it is
refused with PrivacyBudgetExceeded.
"""

from __future__ import annotations

from ..accounting import PrivacyAccountant, PrivacyBudgetExceeded, max_steps_within
from ..plan import PrivacyPlan


class Budget:
    """Whether the plan's max_epsilon allows another step (always, without max_epsilon)."""

    def __init__(self, plan: PrivacyPlan, accountant: PrivacyAccountant | None):
        self.plan = plan
        self.accountant = accountant
        self._allowed_steps: int | None = None

    def allows_another_step(self) -> bool:
        if self.plan.max_epsilon is None:
            return True
        if self._allowed_steps is None:
            self._allowed_steps = self.accountant.steps + max_steps_within(
                self.plan.max_epsilon, self.plan.delta, self.plan.noise_multiplier, self.plan.sample_rate,
                prior=tuple(self.accountant.history))
        return self.accountant.steps + 1 <= self._allowed_steps

    def refuse_exceeding(self) -> None:
        """Raise PrivacyBudgetExceeded if another step would take epsilon above max_epsilon."""
        if not self.allows_another_step():
            spent = self.accountant.get_epsilon(self.plan.delta)[2]
            raise PrivacyBudgetExceeded(
                f"another step would take epsilon above max_epsilon={self.plan.max_epsilon} at delta="
                f"{self.plan.delta} (spent: {spent:.4g} after {self.accountant.steps} steps).")

    def forget(self) -> None:
        """Recompute the allowed steps on the next check (the accountant's history was replaced)."""
        self._allowed_steps = None


def record_step(accountant: PrivacyAccountant | None, plan: PrivacyPlan) -> None:
    """Add one step of the plan's Gaussian mechanism (noise_multiplier, sample_rate) to the history."""
    if accountant is not None:
        accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
