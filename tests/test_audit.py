"""One-run privacy audit: the Steinke-Nasr-Jagielski bound, and audits of real prism runs."""

import math

import pytest
import torch

from canaries import audit_task, per_example_loss
from helpers import make_batch, per_example_losses, tiny_model
from prism import PRISM, NaiveDPLoRA
from prism.audit import audit, best_bound, canary_losses, count_correct, epsilon_lower_bound, guess, p_value


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_guesses_match_the_closed_form(r):
    # P[Bin(r, p) >= r] = p^r = 0.05 at the bound: epsilon = log(p / (1 - p)), p = 0.05^(1/r)
    p = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, r) == pytest.approx(math.log(p / (1 - p)), abs=1e-9)


def test_p_value_against_direct_binomial_sums():
    m, r, v, eps, delta = 500, 40, 31, 0.7, 1e-4
    p = 1 / (1 + math.exp(-eps))

    def f(k):
        return sum(math.comb(r, j) * p ** j * (1 - p) ** (r - j) for j in range(max(k, 0), r + 1))

    alpha = max((f(v - i) - f(v)) / i for i in range(1, v + 1))
    assert p_value(v, r, m, eps) == pytest.approx(f(v), rel=1e-12)
    assert p_value(v, r, m, eps, delta) == pytest.approx(f(v) + 2 * m * delta * alpha, rel=1e-12)


def test_chance_level_gives_zero_and_the_bound_is_monotone():
    assert epsilon_lower_bound(0, 0, 100) == 0.0
    assert epsilon_lower_bound(50, 100, 100) == 0.0
    assert epsilon_lower_bound(58, 100, 100) == 0.0  # within the noise of 100 fair coins
    by_correct = [epsilon_lower_bound(v, 100, 1000) for v in range(60, 101, 5)]
    assert all(a < b for a, b in zip(by_correct, by_correct[1:]))
    by_delta = [epsilon_lower_bound(90, 100, 1000, delta=d) for d in (0, 1e-6, 1e-4, 1e-3)]
    assert all(a > b for a, b in zip(by_delta, by_delta[1:]))
    by_confidence = [epsilon_lower_bound(90, 100, 1000, confidence=c) for c in (0.5, 0.9, 0.95, 0.99)]
    assert all(a > b for a, b in zip(by_confidence, by_confidence[1:]))
    # delta's price grows with the number of canaries; without delta they do not matter
    assert epsilon_lower_bound(90, 100, 100, delta=1e-4) > epsilon_lower_bound(90, 100, 10_000, delta=1e-4)
    assert epsilon_lower_bound(90, 100, 100) == epsilon_lower_bound(90, 100, 10_000)


def test_p_value_is_monotone_in_epsilon_and_in_correct_guesses():
    for delta in (0.0, 1e-5, 1e-3):
        grid = [[p_value(v, 60, 300, eps, delta) for eps in (0, 0.5, 1, 2, 4, 8)] for v in range(0, 61, 3)]
        for row in grid:
            assert all(a <= b + 1e-12 for a, b in zip(row, row[1:]))
        for column in zip(*grid):
            assert all(a >= b - 1e-12 for a, b in zip(column, column[1:]))


@pytest.mark.parametrize("eps_true,delta", [(1.0, 0.0), (3.0, 1e-5)])
def test_randomized_response_is_covered_at_the_confidence_level(eps_true, delta):
    """Randomized response with parameter eps_true (each guess right with probability
    e^eps / (1 + e^eps)) is the worst case of the bound: it must exceed eps_true in at most
    about 5% of runs, and still detect a good part of eps_true."""
    g = torch.Generator().manual_seed(0)
    r, trials = 200, 2000
    right = torch.rand(trials, r, generator=g, dtype=torch.float64) < 1 / (1 + math.exp(-eps_true))
    counts = right.sum(1).tolist()
    bound = {v: epsilon_lower_bound(v, r, r, delta) for v in set(counts)}
    lower = torch.tensor([bound[v] for v in counts])
    exceed = (lower > eps_true).double().mean().item()
    assert exceed <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert lower.mean() > 0.5 * eps_true


@pytest.mark.parametrize("args,error", [
    ((5, 4, 10), ValueError), ((4, 5, 4), ValueError), ((-1, 4, 10), ValueError), ((1.0, 4, 10), TypeError),
    ((1, 4, 10, 1.0), ValueError), ((1, 4, 10, -0.1), ValueError), ((1, 4, 10, 0.0, 1.0), ValueError),
])
def test_bad_counts_and_levels_raise(args, error):
    with pytest.raises(error):
        epsilon_lower_bound(*args)


def test_guesses_and_their_count():
    scores = torch.tensor([0.9, -1.0, 0.2, 3.0, -0.5, 0.0])
    included = torch.tensor([True, False, True, False, False, True])
    guesses = guess(scores, 2, 1)
    assert guesses.tolist() == [1, -1, 0, 1, 0, 0]
    assert count_correct(guesses, included) == (2, 3)
    with pytest.raises(ValueError):
        guess(scores, 4, 3)
    # one choice is the plain bound; several pay with a union bound
    one = best_bound(scores, included, [(2, 1)])
    assert one == (epsilon_lower_bound(2, 3, 6), 2, 3, 2, 1)
    perfect = torch.arange(100.0)
    coins = perfect >= 50
    single = best_bound(perfect, coins, [(50, 50)])[0]
    assert best_bound(perfect, coins, [(50, 50), (10, 10)])[0] == epsilon_lower_bound(100, 100, 100, confidence=0.975)
    assert best_bound(perfect, coins, [(50, 50), (10, 10)])[0] < single


class _TooLittleNoise(PRISM):
    """A broken PRISM: its noise is 20 times smaller than the accountant is told."""

    @property
    def noise_std(self):
        return super().noise_std / 20


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: on a busy machine a second thread only waits
    yield
    torch.set_num_threads(threads)


def _audit(optimizer_class, noise_multiplier, n=300, m=400, steps=60):
    model, data, canaries = audit_task(n, m, seed=1)
    q = 0.1
    optimizer = optimizer_class(model, lr=0.05, max_grad_norm=0.5, noise_multiplier=noise_multiplier, delta=1e-5,
                                sample_rate=q, expected_batch_size=q * (n + m / 2), loss_reduction="sum",
                                generator=torch.Generator().manual_seed(2))
    return audit(model, optimizer, canaries, per_example_loss, steps=steps, data=data,
                 generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("optimizer_class", [PRISM, NaiveDPLoRA])
def test_audit_detects_training_without_noise(optimizer_class, one_thread):
    result = _audit(optimizer_class, 0.0)
    assert result.epsilon_reported == math.inf
    assert (result.correct, result.guesses) == (80, 80)  # the 40 highest and 40 lowest scores, all right
    assert result.epsilon_lower > 3.0


def test_audit_stays_below_the_reported_epsilon_and_catches_too_little_noise(one_thread):
    honest = _audit(PRISM, 3.0)
    broken = _audit(_TooLittleNoise, 3.0)
    assert honest.epsilon_reported == broken.epsilon_reported < 2.0
    assert honest.epsilon_lower <= honest.epsilon_reported
    assert broken.epsilon_lower > 1.5 * broken.epsilon_reported


def test_audit_runs_on_a_peft_transformer_with_dict_batches(one_thread):
    model = tiny_model("bert", r=2, hidden=16, dtype=torch.float32)
    data, canaries = make_batch("bert", 60, seed=1), make_batch("bert", 40, seed=2)
    optimizer = NaiveDPLoRA(model, lr=0.05, noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=0.5,
                            expected_batch_size=40.0, loss_reduction="mean")
    def loss_fn(model, batch):
        return per_example_losses("bert", model, batch)

    before = canary_losses(model, canaries, loss_fn)
    result = audit(model, optimizer, canaries, loss_fn, steps=15, data=data, choices=[(5, 5), (10, 10)],
                   micro_batch_size=16, generator=torch.Generator().manual_seed(0))
    assert optimizer.steps_taken == 15 and result.canaries == 40 and 0 < result.included.sum() < 40
    # float64 casts of float32 losses (computed in other micro-batches): float32's tolerances apply
    float32 = dict(rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(result.scores, before - canary_losses(model, canaries, loss_fn), **float32)
    assert count_correct(guess(result.scores, result.k_in, result.k_out), result.included) == (result.correct,
                                                                                               result.guesses)
    assert result.epsilon_reported is None  # delta 0: nothing to compare with
