"""benchmarks.synthetic's measures: Frechet distance, n-gram copies, canary exposure and scoring, the
sampling filters, MAUVE and its stage, and Private Evolution's votes, noise and accounting."""

import math
import random

import numpy as np
import pytest
import torch
from scipy import linalg

from benchmarks import private_evolution as pe
from benchmarks import synthetic_metrics as metrics
from prism.examples.synthetic_sampling import SamplingConfig, clean, rejection


def smollm2_or_skip():
    """SmolLM2's folder (its tokenizer serves the tiny test models), or skip when its package is missing."""
    from prism.pretrained import smollm2

    try:
        return smollm2()
    except ImportError as exc:
        pytest.skip(str(exc))


def test_frechet_distance_is_zero_for_one_sample_and_matches_the_matrix_square_root_formula():
    g = np.random.default_rng(0)
    x, y = g.normal(size=(400, 6)), g.normal(size=(300, 6)) @ np.diag([1, 2, 1, 1, 0.5, 1]) + 0.3
    assert metrics.frechet_distance(x, x) == pytest.approx(0, abs=1e-9)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    brute = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sx + sy - 2 * linalg.sqrtm(sx @ sy).real)
    assert metrics.frechet_distance(x, y) == pytest.approx(brute, rel=1e-8)


def test_frechet_distance_is_small_within_a_distribution_and_grows_with_a_shift():
    g = np.random.default_rng(1)
    a, b = g.normal(size=(2000, 8)), g.normal(size=(2000, 8))
    same = metrics.frechet_distance(a, b)
    shifted = [metrics.frechet_distance(a, b + s) for s in (0.25, 0.5, 1.0)]
    assert same < 0.05
    assert same < shifted[0] < shifted[1] < shifted[2]
    assert shifted[2] == pytest.approx(8 * 1.0 ** 2, rel=0.05)  # ||mu shift||^2 dominates
    with pytest.raises(ValueError, match="same d"):
        metrics.frechet_distance(a, b[:, :3])


def test_kmeans_finds_separated_clusters_whatever_their_order():
    g = np.random.default_rng(2)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = g.integers(3, size=300)
    labels = metrics.kmeans(centres[truth] + g.normal(scale=0.5, size=(300, 2)), 3, seed=0)
    assert len(set(zip(truth.tolist(), labels.tolist()))) == 3  # one cluster per blob, one blob per cluster


def test_mauve_is_one_for_equal_sets_near_its_floor_for_disjoint_ones_and_falls_with_a_shift():
    g = np.random.default_rng(3)
    a, b = g.normal(size=(1000, 8)), g.normal(size=(1000, 8))
    assert metrics.mauve(a, a) == pytest.approx(1.0)
    same = metrics.mauve(a, b)
    shifted = [metrics.mauve(a, b + s) for s in (0.5, 1.0, 3.0)]
    assert same > 0.9 and same > shifted[0] > shifted[1] > shifted[2]
    # disjoint histograms: KL(Q || R_l) = -log(1 - l), KL(P || R_l) = -log(l), the curve ((1 - l)^5, l^5)
    far = metrics.mauve(a, b + 1000.0)
    weights = np.linspace(1e-6, 1 - 1e-6, 25)
    xs, ys = np.r_[0.0, (1 - weights[::-1]) ** 5, 1.0], np.r_[1.0, weights[::-1] ** 5, 0.0]
    assert far == pytest.approx(float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2)), rel=1e-9)
    assert far < 0.01  # the exact area, 5 B(6, 5) = 0.004, up to the 25-point discretisation
    with pytest.raises(ValueError, match="same d"):
        metrics.mauve(a, b[:, :3])


def test_copy_rates_find_8_gram_copies_on_either_side_and_only_them():
    train = ["the quick brown fox jumps over the lazy dog today", "a film about nothing at all, twice over"]
    heldout = ["an honest and keenly observed film that never feels like an issue movie", "short one"]
    texts = ["yesterday THE quick brown fox jumps over the lazy dog!",  # 8-gram from train (case ignored)
             "honest and keenly observed film that never feels like",  # 9 words of held-out
             "the quick brown fox jumps over the cat",  # 7 shared words only
             "nothing in common here"]
    rates = metrics.copy_rates(texts, train, heldout, n=8)
    assert rates == dict(n=8, reference_size=2, train=0.25, heldout=0.25)
    assert metrics.copy_share(texts, [], 8) == 0
    assert metrics.copy_share(texts[:1], train, n=11) == 0  # the copied span has 9 words


def test_exposure_ranks_and_the_chance_level():
    candidates = np.arange(99.0)  # scores 0..98
    assert metrics.exposure(1000.0, candidates) == pytest.approx(math.log2(100))  # first: all bits
    assert metrics.exposure(-1.0, candidates) == pytest.approx(0.0)  # last
    assert metrics.exposure(48.5, candidates) == pytest.approx(math.log2(100) - math.log2(51))
    assert metrics.exposure(49.0, candidates) == pytest.approx(math.log2(100) - math.log2(50.5))  # a tie counts 1/2
    rng = random.Random(0)  # a secret scored like its candidates ranks uniformly: the chance level
    draws = [metrics.exposure(rng.random(), [rng.random() for _ in range(99)]) for _ in range(3000)]
    assert np.mean(draws) == pytest.approx(metrics.chance_mean_exposure(99), abs=0.08)
    assert metrics.chance_mean_exposure(10 ** 6) == pytest.approx(1 / math.log(2), abs=1e-3)


def test_canary_log_likelihoods_score_the_review_only_and_do_not_depend_on_the_batch():
    smollm2_or_skip()
    from benchmarks.canaries import completion_logprobs, make_canaries
    from prism.examples.synthetic import load_base
    from prism.examples.synthetic_data import SENTIMENT

    prompt = SENTIMENT.prompt
    tokenizer, model = load_base(quick=True)
    secrets = make_canaries(2, 5, seed=0)
    assert len({c.code for s, others in secrets for c in [s, *others]}) == 12
    texts = [c.text for c in [secrets[0][0], *secrets[0][1]]] + ["a much longer review of the film that pads others"]
    batched = completion_logprobs(model, tokenizer, prompt(1), texts, batch_size=3)
    for text, score in zip(texts, batched):
        ids = torch.tensor([tokenizer(prompt(1) + " " + text)["input_ids"] + [tokenizer.eos_token_id]])
        head = len(tokenizer(prompt(1))["input_ids"])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        direct = logp[torch.arange(head - 1, ids.shape[1] - 1), ids[0, head:]].sum().item()
        assert score == pytest.approx(direct, abs=1e-3)


def test_sampling_filters():
    config = SamplingConfig()
    assert clean('  "A fine film."\nSentiment: positive') == "A fine film."
    assert rejection("a fine film indeed", finished=False, config=config) == "unfinished"
    assert rejection("1999 !!", True, config) == "no letters"
    assert rejection("great. Review: more", True, config) == "scaffolding"
    assert rejection("great film", True, config) == "too short"
    assert rejection(" ".join(["word"] * 51), True, config) == "too long"
    assert rejection("a fine film indeed", True, config) is None


def test_votes_go_to_the_nearest_sample_of_the_same_label_and_one_example_moves_one_count():
    synthetic = np.array([[0.0, 0], [10, 0], [0, 10], [10, 10]])
    synthetic_labels = [0, 0, 1, 1]
    private = np.array([[1.0, 1], [9, 1], [9, 2], [1, 1], [9, 9]])
    private_labels = [0, 0, 0, 1, 1]  # the 4th is nearest to sample 0 but must vote among label 1's
    h = pe.votes(private, private_labels, synthetic, synthetic_labels)
    assert h.tolist() == [1, 2, 1, 1]
    for i in range(len(private)):  # add/remove neighbours: the histograms differ by 1 in one bin (sensitivity 1)
        keep = [j for j in range(len(private)) if j != i]
        diff = h - pe.votes(private[keep], [private_labels[j] for j in keep], synthetic, synthetic_labels)
        assert sorted(diff.tolist()) == [0, 0, 0, 1]


def test_histogram_noise_has_std_sigma_and_the_threshold_zeroes_small_bins():
    sigma, h = 1.7, np.zeros(200_000)
    noisy = pe.noisy_histogram(h, sigma, -np.inf, torch.Generator().manual_seed(0))
    assert noisy.std() == pytest.approx(sigma, rel=0.01)
    assert abs(noisy.mean()) < 0.02
    again = pe.noisy_histogram(h, sigma, -np.inf, torch.Generator().manual_seed(0))
    assert np.array_equal(noisy, again)
    cut = pe.noisy_histogram(np.array([0.0, 100.0]), 0.1, 5.0, torch.Generator().manual_seed(0))
    assert cut[0] == 0 and cut[1] == pytest.approx(100, abs=1)


def test_draw_is_proportional_within_each_label_and_uniform_when_all_bins_are_zero():
    rng = np.random.default_rng(0)
    weights, labels = np.array([3.0, 1.0, 0.0, 0.0, 0.0]), [0, 0, 0, 1, 1]
    chosen = pe.draw(weights, labels, 4000, rng)
    first = chosen[:4000]
    assert set(first) <= {0, 1} and np.mean(np.array(first) == 0) == pytest.approx(0.75, abs=0.03)
    assert np.mean(np.array(chosen[4000:]) == 3) == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("sigma, iterations", [(1.0, 3), (2.5, 10)])
def test_pe_epsilon_from_prisms_accountant_matches_the_exact_gaussian_composition(sigma, iterations):
    lower, _, upper = pe.epsilon_spent(sigma, iterations, 1e-5)
    exact = pe.gdp_epsilon(sigma, iterations, 1e-5)
    assert lower - 1e-6 <= exact <= upper + 1e-6
    assert upper - lower < 0.05
    # T mechanisms of multiplier sigma = one of multiplier sigma / sqrt(T)
    assert exact == pytest.approx(pe.gdp_epsilon(sigma / math.sqrt(iterations), 1, 1e-5), rel=1e-9)


def test_pe_calibration_reaches_the_target_and_no_less_noise_would():
    sigma = pe.noise_multiplier(8.0, 1e-5, 3)
    assert pe.epsilon_spent(sigma, 3, 1e-5)[2] <= 8.0
    assert pe.gdp_epsilon(sigma * 0.98, 3, 1e-5) > 8.0 - 0.05  # 2 % less noise: about the target or above
    with pytest.raises(ValueError, match="iterations"):
        pe.Config(iterations=0)


def test_the_mauve_stage_fills_in_older_results_from_their_samples_and_leaves_the_rest(tmp_path, monkeypatch, capsys):
    import zlib

    from benchmarks import common, synthetic as study, tasks
    from prism.examples.synthetic import write_jsonl

    class HashEmbedder:  # a fixed random unit vector per text: no model needed
        def __call__(self, texts):
            rows = np.array([np.random.default_rng(zlib.crc32(t.encode())).normal(size=16) for t in texts])
            return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    monkeypatch.setattr(metrics, "Embedder", HashEmbedder)
    words = [f"review number {i}" for i in range(300)]
    split = tasks.Split(words[:200], [i % 2 for i in range(200)], [], [], words[200:], [0] * 100)
    evaluate = tmp_path / "synthetic" / "evaluate"
    for run in ("old_eps8_seed1", "gone_eps8_seed0", "new_eps8_seed0"):
        common.write_json(evaluate / f"{run}.json", dict(seed=int(run[-1]), frechet_to_test=0.1,
                                                         **(dict(mauve_to_test=0.5) if run.startswith("new") else {})))
    common.write_json(evaluate / "real_reference.json", dict(frechet_to_test=0.01))
    samples = [dict(text=f"sample {i}", label=i % 2) for i in range(60)]
    write_jsonl(study.samples_path(tmp_path, "old_eps8_seed1"), samples)
    study.add_mauve(split, tmp_path)
    read = {p.stem: common.read_json(p) for p in evaluate.glob("*.json")}
    assert 0 < read["old_eps8_seed1"]["mauve_to_test"] < 1 and "commit" in read["old_eps8_seed1"]["mauve_added_by"]
    assert 0 < read["real_reference"]["mauve_to_test"] <= 1
    assert "mauve_to_test" not in read["gone_eps8_seed0"] and read["new_eps8_seed0"]["mauve_to_test"] == 0.5
    assert "gone_eps8_seed0: no samples left" in capsys.readouterr().out
    before = read["old_eps8_seed1"]["mauve_to_test"]
    del read["old_eps8_seed1"]["mauve_to_test"]
    common.write_json(evaluate / "old_eps8_seed1.json", read["old_eps8_seed1"])
    study.add_mauve(split, tmp_path)  # seeded: the same value again
    assert common.read_json(evaluate / "old_eps8_seed1.json")["mauve_to_test"] == before
