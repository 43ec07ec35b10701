"""(epsilon, delta) of Poisson-subsampled Gaussian steps, on Microsoft's prv-accountant.

The history is a list of runs (noise_multiplier, sample_rate, count): a schedule, several
phases and a resumed run all compose correctly (heterogeneous PRV composition). Queries are
cached per history and delta.

Formal guarantees: `get_epsilon` returns (lower, estimate, upper) with the true epsilon of the
composed mechanism in [lower, upper] (PRV accountant error bounds). Claims must use `upper`.
If the PRV accountant fails (prv-accountant 0.2.0 raises "Discrete mean differs significantly
from continuous mean" for some settings), an RDP bound is returned instead, with a warning: a
valid but looser upper bound, never a smaller one, never no answer. A run with noise_multiplier
0 has epsilon = inf.

    python -m prism epsilon --sigma 1.0 --q 0.01 --steps 1000 --delta 1e-5
    python -m prism sigma --epsilon 3 --q 0.01 --steps 1000 --delta 1e-5
"""

from __future__ import annotations

import argparse
import math
import warnings
from typing import NamedTuple

import numpy as np

from . import _validate

try:
    from prv_accountant import PRVAccountant
    from prv_accountant.accountant import compute_safe_domain_size
    from prv_accountant.other_accountants import RDP
    from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism
except ImportError as exc:  # pragma: no cover - a hard dependency
    raise ImportError("prism's accounting needs prv-accountant: pip install prv-accountant") from exc

DEFAULT_EPS_ERROR = 0.01
HEADROOM = 2  # PRV domains are sized for twice the steps taken (rebuilt when exceeded)
MAX_GRID_POINTS = 4_000_000  # about 15 s and a few hundred MB per PRV accountant
MAX_STEPS = 10 ** 7  # max_steps_within() does not search beyond this many steps
MAX_NOISE_MULTIPLIER = 1e4  # calibration searches noise multipliers up to this


class Run(NamedTuple):
    """`count` consecutive steps with the same noise multiplier and Poisson sampling rate."""

    noise_multiplier: float
    sample_rate: float
    count: int


class PrivacyBudgetExceeded(RuntimeError):
    """Raised before a step that would take epsilon above the allowed maximum."""


def validate_mechanism(noise_multiplier: float, sample_rate: float) -> None:
    _validate.non_negative(noise_multiplier=noise_multiplier)
    _validate._number("sample_rate", sample_rate)
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")


def validate_delta(delta: float) -> None:
    _validate._number("delta", delta)
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")


class PrivacyAccountant:
    """Tracks the privacy spent by Poisson-subsampled Gaussian steps.

    Args:
        eps_error: the PRV accountant's epsilon error; upper - lower is about 2 eps_error
            (default: 0.01).
        planned_steps: size the PRV grids for at least this many steps from the start. The grid
            depends on the steps it is sized for, so an accountant queried along the way (sized for
            the steps so far) would otherwise end on another grid than calibration's (sized for the
            plan): both bounds are valid, but the reported epsilon could then exceed the calibrated
            target by about 1e-5. With the plan's steps the two are the same computation.
    """

    def __init__(self, eps_error: float = DEFAULT_EPS_ERROR, planned_steps: int | None = None):
        _validate.positive(eps_error=eps_error)
        if planned_steps is not None and (not isinstance(planned_steps, int) or planned_steps <= 0):
            raise ValueError(f"planned_steps must be an integer > 0, got {planned_steps!r}")
        self.eps_error = eps_error
        self.planned_steps = planned_steps
        self.history: list[Run] = []
        self._cache: dict = {}
        self._prv: dict = {}

    @property
    def steps(self) -> int:
        return sum(run.count for run in self.history)

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record `num_steps` steps (merged into the last run when the mechanism is the same)."""
        validate_mechanism(noise_multiplier, sample_rate)
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}")
        if num_steps == 0:
            return
        noise_multiplier, sample_rate = float(noise_multiplier), float(sample_rate)
        last = self.history[-1] if self.history else None
        if last is not None and (last.noise_multiplier, last.sample_rate) == (noise_multiplier, sample_rate):
            self.history[-1] = last._replace(count=last.count + num_steps)
        else:
            self.history.append(Run(noise_multiplier, sample_rate, num_steps))

    def get_epsilon(self, delta: float) -> tuple[float, float, float]:
        """(lower, estimate, upper) epsilon at `delta` for the history so far."""
        validate_delta(delta)
        return self._query("epsilon", delta)

    def get_delta(self, epsilon: float) -> tuple[float, float, float]:
        """(lower, estimate, upper) delta at `epsilon` for the history so far."""
        _validate.non_negative(epsilon=epsilon)
        return self._query("delta", epsilon)

    def state_dict(self) -> dict:
        return {"history": [tuple(run) for run in self.history], "eps_error": self.eps_error}

    def load_state_dict(self, state: dict) -> None:
        self.eps_error = float(state["eps_error"])
        self.history = [Run(float(s), float(q), int(c)) for s, q, c in state["history"]]
        self._cache.clear()

    def _query(self, kind: str, value: float) -> tuple[float, float, float]:
        runs = tuple(run for run in self.history if run.count > 0)
        key = (kind, value, runs, self.eps_error)
        if key not in self._cache:
            self._cache[key] = _compute(kind, value, runs, self.eps_error, self._prv, self.planned_steps or 0)
        return self._cache[key]


def _compute(kind: str, value: float, runs: tuple[Run, ...], eps_error: float, prv_cache: dict,
             planned_steps: int = 0):
    if not runs:
        return (0.0, 0.0, 0.0)  # nothing released: epsilon 0, and delta 0 at any epsilon
    if any(run.noise_multiplier == 0 for run in runs):
        return (math.inf, math.inf, math.inf) if kind == "epsilon" else (1.0, 1.0, 1.0)
    mechanisms = [PoissonSubsampledGaussianMechanism(noise_multiplier=run.noise_multiplier,
                                                     sampling_probability=run.sample_rate) for run in runs]
    counts = [run.count for run in runs]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if kind == "epsilon":
                accountant = _prv_accountant(mechanisms, runs, counts, eps_error, value * 1e-3, prv_cache, planned_steps)
                result = accountant.compute_epsilon(delta=value, num_self_compositions=counts)
            else:
                accountant = _prv_accountant(mechanisms, runs, counts, eps_error, 1e-9, prv_cache, planned_steps)
                result = accountant.compute_delta(epsilon=value, num_self_compositions=counts)
        result = tuple(float(x) for x in result)
        if not all(np.isfinite(result)) or result[2] < result[0]:
            raise ArithmeticError(f"the PRV accountant returned {result}")
    except Exception as exc:  # noqa: BLE001 - any failure falls back to a valid bound
        warnings.warn(f"the PRV accountant failed ({type(exc).__name__}: {exc}); reporting the looser RDP "
                      "bound instead", RuntimeWarning, stacklevel=3)
        return _rdp_bound(kind, value, mechanisms, counts)
    if kind == "delta":
        return tuple(min(max(x, 0.0), 1.0) for x in result)
    return result


def _prv_accountant(mechanisms, runs, counts, eps_error, delta_error, cache, planned_steps: int = 0):
    """A PRV accountant for these mechanisms, sized for HEADROOM x the steps of each run (at least
    planned_steps); rebuilt when exceeded."""
    key = (tuple((run.noise_multiplier, run.sample_rate) for run in runs), eps_error, delta_error)
    entry = cache.get(key)
    if entry is None or any(c > m for c, m in zip(counts, entry[1])):
        capacity = [max(HEADROOM * max(c, planned_steps), 16) for c in counts]
        eps_error = _affordable_eps_error(mechanisms, capacity, eps_error, delta_error)
        entry = (PRVAccountant(prvs=mechanisms, eps_error=eps_error, delta_error=delta_error,
                               max_self_compositions=capacity), capacity)
        cache[key] = entry
    return entry[0]


def _affordable_eps_error(mechanisms, capacity, eps_error, delta_error) -> float:
    """eps_error, raised where needed so the PRV grid has at most MAX_GRID_POINTS points.

    The grid spans [-L, L] with mesh eps_error / sqrt(T/2 log(12/delta_error)) (Gopi et al. 2021,
    Thm 5.5), so its size grows like sqrt(T) / eps_error. A larger eps_error widens the
    (lower, upper) interval; the bounds stay valid.
    """
    half_width = compute_safe_domain_size(mechanisms, capacity, eps_error=eps_error, delta_error=delta_error)
    points = 2 * half_width * math.sqrt(sum(capacity) / 2 * math.log(12 / delta_error)) / eps_error
    if points <= MAX_GRID_POINTS:
        return eps_error
    coarser = eps_error * points / MAX_GRID_POINTS
    warnings.warn(f"{sum(capacity)} compositions need a PRV grid of {points:.3g} points at eps_error={eps_error}; "
                  f"using eps_error={coarser:.3g} (wider but valid bounds)", UserWarning, stacklevel=5)
    return coarser


def _rdp_bound(kind: str, value: float, mechanisms, counts) -> tuple[float, float, float]:
    """RDP upper bounds (the lower bound is unknown and reported as 0 for epsilon)."""
    rdp = RDP(prvs=mechanisms)
    if kind == "epsilon":
        _, _, upper = rdp.compute_epsilon(delta=value, num_self_compositions=counts)
        return (0.0, float(upper), float(upper))
    orders = rdp.orders
    total = sum(r * n for r, n in zip(rdp.rdps, counts))
    log_delta = (orders - 1) * (total - value + np.log1p(-1 / orders)) - np.log(orders)
    upper = float(min(1.0, np.exp(np.nanmin(log_delta))))
    return (0.0, upper, upper)


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                eps_error: float = DEFAULT_EPS_ERROR) -> tuple[float, float, float]:
    """(lower, estimate, upper) epsilon of `steps` Poisson-subsampled Gaussian steps."""
    accountant = PrivacyAccountant(eps_error)
    accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=steps)
    return accountant.get_epsilon(delta)


def steps_in_epochs(epochs: float, sample_rate: float) -> int:
    """ceil(epochs / q), the float quotient first rounded to 9 decimals: q = b / N is rarely exact in
    binary, and 1 / (10 / 8530) = 853.0000000000001 must give 853 steps, not 854."""
    return math.ceil(round(epochs / sample_rate, 9))


def steps_from(sample_rate: float, steps: int | None, epochs: float | None) -> int:
    """Exactly one of steps or epochs (steps = ceil(epochs / sample_rate))."""
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs")
    if epochs is not None:
        _validate.positive(epochs=epochs)
        return steps_in_epochs(epochs, sample_rate)
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be an integer > 0, got {steps!r}")
    return steps


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int | None = None,
                               *, epochs: float | None = None, eps_error: float = DEFAULT_EPS_ERROR,
                               tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (to a relative `tolerance`, rounded up) whose UPPER epsilon
    after `steps` (or `epochs`) Poisson steps at `sample_rate` is <= target_epsilon.

    Each PRV query takes seconds (tens at small noise multipliers), so the search starts where
    the cheap RDP bound reaches the target (its answer is 5-30 % above the PRV one), brackets the
    PRV answer from there and closes the bracket by regula falsi on log epsilon against log sigma:
    typically 4-6 PRV queries instead of a dozen for bisection.

    Raises:
        ValueError: invalid inputs, or a target no noise multiplier up to MAX_NOISE_MULTIPLIER reaches.
    """
    _validate.positive(target_epsilon=target_epsilon)
    validate_delta(delta)
    validate_mechanism(1.0, sample_rate)
    steps = steps_from(sample_rate, steps, epochs)

    def upper(sigma: float) -> float:
        return epsilon_for(sigma, sample_rate, steps, delta, eps_error)[2]

    high = _rdp_noise_multiplier(target_epsilon, delta, sample_rate, steps)
    f_high, factor = upper(high), BRACKET_FACTOR
    while f_high > target_epsilon:
        if high >= MAX_NOISE_MULTIPLIER:
            raise ValueError(f"target_epsilon={target_epsilon} is unreachable at delta={delta}, sample_rate="
                             f"{sample_rate}, {steps} steps (even noise_multiplier={MAX_NOISE_MULTIPLIER:g} exceeds "
                             "it); raise the target, lower the sampling rate or the steps.")
        high = min(high * factor, MAX_NOISE_MULTIPLIER)
        f_high, factor = upper(high), factor ** 2
    low, factor = high / BRACKET_FACTOR, BRACKET_FACTOR
    f_low = upper(low)
    while f_low <= target_epsilon:
        if low <= MIN_NOISE_MULTIPLIER:
            return low
        high, f_high = low, f_low
        low, factor = max(low / factor, MIN_NOISE_MULTIPLIER), factor ** 2
        f_low = upper(low)
    return _close_bracket(upper, target_epsilon, (low, f_low), (high, f_high), tolerance)


BRACKET_FACTOR = 1.15  # first step from the RDP answer while bracketing the PRV one
MIN_NOISE_MULTIPLIER = 1e-3  # calibration searches noise multipliers down to this


def _rdp_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to 1 %, capped at MAX_NOISE_MULTIPLIER) whose RDP bound is
    <= target_epsilon, by bisection on log sigma (each RDP query takes milliseconds)."""
    def rdp_upper(sigma: float) -> float:
        mechanism = PoissonSubsampledGaussianMechanism(noise_multiplier=sigma, sampling_probability=sample_rate)
        return _rdp_bound("epsilon", delta, [mechanism], [steps])[2]

    low, high = MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
    if rdp_upper(high) > target_epsilon:
        return high
    while high > 1.01 * low:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if rdp_upper(middle) <= target_epsilon else (middle, high)
    return high


def _close_bracket(upper, target: float, low: tuple[float, float], high: tuple[float, float],
                   tolerance: float) -> float:
    """The smallest sigma with upper(sigma) <= target, to a relative `tolerance`, given
    upper(low) > target >= upper(high): Illinois regula falsi on g = log(upper / target) against
    log sigma, each trial kept at least tolerance / 2 inside the bracket so the last one closes it."""
    def g(f: float) -> float:
        return math.log(max(f, 1e-300) / target)

    (low, g_low), (high, g_high) = (low[0], g(low[1])), (high[0], g(high[1]))
    last_moved = None
    while high - low > tolerance * high:
        x_low, x_high = math.log(low), math.log(high)
        if math.isfinite(g_low) and g_low > g_high:
            x = x_high - g_high * (x_high - x_low) / (g_high - g_low)
        else:
            x = (x_low + x_high) / 2
        margin = tolerance * high / 2
        trial = min(max(math.exp(x), low + margin), high - margin)
        f = upper(trial)
        if f <= target:
            high, g_high = trial, g(f)
            if last_moved == "high":
                g_low /= 2
            last_moved = "high"
        else:
            low, g_low = trial, g(f)
            if last_moved == "low":
                g_high /= 2
            last_moved = "low"
    return high


def max_steps_within(max_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
                     prior: tuple[Run, ...] = (), eps_error: float = DEFAULT_EPS_ERROR) -> int:
    """The largest number of further steps whose upper epsilon (after `prior`) stays <= max_epsilon."""
    def fits(n: int) -> bool:
        accountant = PrivacyAccountant(eps_error)
        for run in prior:
            accountant.step(noise_multiplier=run.noise_multiplier, sample_rate=run.sample_rate, num_steps=run.count)
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=n)
        return accountant.get_epsilon(delta)[2] <= max_epsilon

    if not fits(0):
        return -1
    low, high = 0, 1
    while fits(high):
        if high >= MAX_STEPS:
            return MAX_STEPS
        low, high = high, min(2 * high, MAX_STEPS)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def main(argv=None) -> None:
    """Command line: epsilon for (sigma, q, steps, delta), or sigma for a target epsilon."""
    parser = argparse.ArgumentParser(prog="prism-epsilon", description="Privacy accounting for Poisson-subsampled "
                                     "Gaussian steps (DP-SGD, PRISM), on Microsoft's prv-accountant.")
    sub = parser.add_subparsers(dest="command", required=True)
    eps = sub.add_parser("epsilon", help="epsilon (lower/estimate/upper) spent by a run")
    eps.add_argument("--sigma", type=float, required=True, help="noise multiplier (> 0)")
    sig = sub.add_parser("sigma", help="the smallest noise multiplier reaching a target epsilon")
    sig.add_argument("--epsilon", type=float, required=True, help="target epsilon (> 0)")
    for command in (eps, sig):
        command.add_argument("--q", type=float, required=True, help="Poisson sampling rate in (0, 1]")
        length = command.add_mutually_exclusive_group(required=True)
        length.add_argument("--steps", type=int, help="number of steps")
        length.add_argument("--epochs", type=float, help="number of epochs (steps = ceil(epochs / q))")
        command.add_argument("--delta", type=float, required=True, help="delta in (0, 1)")
        command.add_argument("--eps-error", type=float, default=DEFAULT_EPS_ERROR,
                             help=f"PRV accountant precision (default: {DEFAULT_EPS_ERROR})")
    args = parser.parse_args(argv)
    try:
        validate_delta(args.delta)
        validate_mechanism(1.0, args.q)
        steps = steps_from(args.q, args.steps, args.epochs)
        if args.command == "epsilon":
            _validate.positive(sigma=args.sigma)
            lower, estimate, upper = epsilon_for(args.sigma, args.q, steps, args.delta, args.eps_error)
            print(f"epsilon upper {upper:.4f} (estimate {estimate:.4f}, lower {lower:.4f}) at delta={args.delta:g} "
                  f"for sigma={args.sigma:g}, q={args.q:g}, {steps} steps")
        else:
            sigma = calibrate_noise_multiplier(args.epsilon, args.delta, args.q, steps, eps_error=args.eps_error)
            print(f"noise multiplier {sigma:.4f} gives epsilon <= {args.epsilon:g} (upper bound) at "
                  f"delta={args.delta:g} for q={args.q:g}, {steps} steps")
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
