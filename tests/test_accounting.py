"""Accounting: agreement with an independent accountant, calibration, composition, resume, fallback."""

import math
import subprocess
import sys

import pytest

from prism import PrivacyAccountant, calibrate_noise_multiplier
from prism import accounting
from prism.accounting import epsilon_for

pld = pytest.importorskip("dp_accounting.pld.privacy_loss_distribution")


def pld_epsilon(runs, delta, interval=1e-4):
    """dp-accounting's PLD (pessimistic, so >= the true epsilon) for [(sigma, q, steps), ...]."""
    total = None
    for sigma, q, steps in runs:
        one = pld.from_gaussian_mechanism(standard_deviation=sigma, sensitivity=1.0, sampling_prob=q,
                                          value_discretization_interval=interval).self_compose(steps)
        total = one if total is None else total.compose(one)
    return total.get_epsilon_for_delta(delta)


GRID = [  # (sigma, q, steps, delta): small sigma, q near and at 1, long runs
    (1.0, 0.01, 1000, 1e-5),
    (0.5, 0.05, 200, 1e-5),
    (2.0, 0.99, 10, 1e-5),
    (5.0, 1.0, 100, 1e-3),
    (0.8, 0.004, 20000, 1e-6),
    (0.6, 0.001, 100000, 1e-6),
]


@pytest.mark.parametrize("sigma, q, steps, delta", GRID)
def test_epsilon_agrees_with_dp_accounting_pld(sigma, q, steps, delta):
    lower, estimate, upper = epsilon_for(sigma, q, steps, delta)
    assert lower <= estimate <= upper and upper - lower < 0.05
    reference = pld_epsilon([(sigma, q, steps)], delta)
    assert lower <= reference  # PLD is pessimistic: the true epsilon >= lower must be below it
    assert reference <= upper * 1.002  # and it is tight, so it falls within (or just above) the bounds


def test_phases_compose_heterogeneously():
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=1.2, sample_rate=0.02, num_steps=300)
    acc.step(noise_multiplier=0.8, sample_rate=0.01, num_steps=200)
    acc.step(noise_multiplier=0.8, sample_rate=0.01, num_steps=100)  # merged into the previous run
    assert [tuple(r) for r in acc.history] == [(1.2, 0.02, 300), (0.8, 0.01, 300)]
    lower, _, upper = acc.get_epsilon(1e-5)
    reference = pld_epsilon([(1.2, 0.02, 300), (0.8, 0.01, 300)], 1e-5)
    assert lower <= reference <= upper * 1.002
    assert upper > epsilon_for(1.2, 0.02, 300, 1e-5)[2]


def test_capacity_is_rebuilt_and_answers_are_cached():
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
    first = acc.get_epsilon(1e-5)
    assert acc.get_epsilon(1e-5) is first  # cached
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=990)  # beyond the first PRV's capacity (20)
    assert acc.get_epsilon(1e-5) == pytest.approx(epsilon_for(1.0, 0.01, 1000, 1e-5))
    assert acc.get_epsilon(1e-5)[2] > first[2]


def test_delta_for_epsilon_is_consistent():
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)
    upper_eps = acc.get_epsilon(1e-5)[2]
    lower, _, upper = acc.get_delta(upper_eps)
    assert lower <= 1e-5 * 1.05 and upper >= 0 and lower <= upper


def test_state_dict_resume_reports_the_same_epsilon():
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=500)
    resumed = PrivacyAccountant()
    resumed.load_state_dict(acc.state_dict())
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=500)
    resumed.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=500)
    assert resumed.get_epsilon(1e-5) == acc.get_epsilon(1e-5)


def test_long_runs_coarsen_the_grid_instead_of_exhausting_memory(monkeypatch):
    exact = epsilon_for(1.0, 0.01, 1000, 1e-5)
    monkeypatch.setattr(accounting, "MAX_GRID_POINTS", 20_000)
    with pytest.warns(UserWarning, match="wider but valid bounds"):
        lower, _, upper = epsilon_for(1.0, 0.01, 1000, 1e-5)
    assert lower <= exact[0] and upper >= exact[2] and upper - lower < 1.0


def test_no_noise_is_infinite_epsilon_and_no_steps_is_zero():
    acc = PrivacyAccountant()
    assert acc.get_epsilon(1e-5) == (0.0, 0.0, 0.0)
    acc.step(noise_multiplier=0.0, sample_rate=0.01)
    assert acc.get_epsilon(1e-5)[2] == math.inf


def test_prv_failure_falls_back_to_a_looser_rdp_bound_with_a_warning(monkeypatch):
    true_upper = epsilon_for(1.0, 0.01, 1000, 1e-5)[2]

    def broken(*args, **kwargs):
        raise RuntimeError("Discrete mean differs from continuous mean significantly.")

    monkeypatch.setattr(accounting, "PRVAccountant", broken)
    with pytest.warns(RuntimeWarning, match="Discrete mean differs"):
        lower, estimate, upper = epsilon_for(1.0, 0.01, 1000, 1e-5)
    assert lower == 0.0 and upper >= true_upper and math.isfinite(upper)


@pytest.mark.parametrize("epsilon, q, steps", [(3.0, 0.03, 60), (1.0, 0.01, 500), (20.0, 0.05, 40)])
def test_calibration_round_trip(epsilon, q, steps, monkeypatch):
    queries = []
    monkeypatch.setattr(accounting, "epsilon_for", lambda *args: queries.append(args) or epsilon_for(*args))
    sigma = calibrate_noise_multiplier(epsilon, 1e-5, q, steps)
    assert len(queries) <= 6  # PRV queries take seconds: RDP start, bracket, regula falsi
    assert epsilon_for(sigma, q, steps, 1e-5)[2] <= epsilon
    assert epsilon_for(sigma * (1 - 1e-3), q, steps, 1e-5)[2] > epsilon  # the smallest, to the 1e-3 tolerance


def test_epochs_count_whole_steps_despite_float_rates():
    assert accounting.steps_from(10 / 8530, None, 1) == 853  # 1 / (10 / 8530) = 853.0000000000001
    assert accounting.steps_from(10 / 8530, None, 2.5) == math.ceil(2.5 * 853)
    assert accounting.steps_from(0.3, None, 1) == 4


def test_calibration_accepts_epochs_and_refuses_the_unreachable():
    by_epochs = calibrate_noise_multiplier(3.0, 1e-5, 0.05, epochs=2)  # 40 steps
    assert by_epochs == calibrate_noise_multiplier(3.0, 1e-5, 0.05, 40)
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise_multiplier(1e-4, 1e-10, 1.0, 10 ** 4)
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        calibrate_noise_multiplier(3.0, 1e-5, 0.05, 40, epochs=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_multiplier=1.0, sample_rate=1.5), "sample_rate"),
    (dict(noise_multiplier=1.0, sample_rate=0.0), "sample_rate"),
    (dict(noise_multiplier=-1.0, sample_rate=0.1), "noise_multiplier"),
])
def test_bad_steps_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrivacyAccountant().step(**kwargs)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5])
def test_bad_delta_is_refused(delta):
    with pytest.raises(ValueError, match="delta"):
        PrivacyAccountant().get_epsilon(delta)


def test_an_accountant_queried_along_a_planned_run_ends_on_the_calibrated_bound():
    """Calibration sizes its PRV grid for the planned steps; a running accountant queried at every step
    (epsilon in the logs) would otherwise end on a grid sized for fewer steps, with another (also valid)
    bound that could exceed the target. With planned_steps both are the same computation."""
    sigma, q, steps, delta = 1.1, 0.02, 40, 1e-5
    calibrated = epsilon_for(sigma, q, steps, delta)
    planned, unplanned = PrivacyAccountant(planned_steps=steps), PrivacyAccountant()
    for _ in range(steps):
        for accountant in (planned, unplanned):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
            accountant.get_epsilon(delta)
    assert planned.get_epsilon(delta) == calibrated
    assert unplanned.get_epsilon(delta) != calibrated  # the grid it ended on is another one


def test_command_line_module_runs():
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "prism", "epsilon", "--sigma", "1.0",
                          "--q", "0.01", "--steps", "1000", "--delta", "1e-5"], capture_output=True, text=True)
    assert out.returncode == 0 and "epsilon upper 1.838" in out.stdout and "Warning" not in out.stderr


def test_command_line_calibrates_and_names_bad_inputs(capsys):
    accounting.main(["sigma", "--epsilon", "3", "--q", "0.05", "--epochs", "2", "--delta", "1e-5"])
    assert "40 steps" in capsys.readouterr().out
    for bad, message in [(["--sigma", "1", "--q", "1.5", "--delta", "1e-5"], "sample_rate"),
                         (["--sigma", "1", "--q", "0.1", "--delta", "1"], "delta"),
                         (["--sigma", "0", "--q", "0.1", "--delta", "1e-5"], "sigma")]:
        with pytest.raises(SystemExit) as exit_info:
            accounting.main(["epsilon", "--steps", "10", *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        accounting.main(["sigma", "--help"])
    assert "--epochs" in capsys.readouterr().out
