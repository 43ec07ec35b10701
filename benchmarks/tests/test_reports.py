"""The summaries the READMEs quote: they cover every result on disk, never only the last run's."""

import argparse

import pytest

from benchmarks import common, llm_report, utility


def test_a_restricted_utility_run_still_summarises_every_method_and_task():
    args = argparse.Namespace(tasks=["sms_spam"], methods=["prism_two_sided"], epsilons=[3.0], seeds=[1], quick=False)
    scope = utility.everything(args)
    assert set(scope.tasks) >= {"rotten_tomatoes", "sms_spam"}
    assert {"prism", "prism_two_sided", "naive", "nonprivate"} <= set(scope.methods)
    assert scope.epsilons == sorted(set(utility.EPSILONS)) and scope.seeds == sorted(set(utility.SEEDS))


def _test_run(folder, method, epsilon, seed, lr, accuracy):
    name = f"{method}_eps{common.epsilon_tag(epsilon)}_seed{seed}_lr{lr}.json"
    common.write_json(folder / "llm" / "test" / name,
                      dict(method=method, target_epsilon=epsilon, seed=seed, lr=lr, test_accuracy=accuracy))


def test_llm_report_gives_mean_and_sample_std_over_seeds_per_method_and_epsilon(tmp_path):
    for seed, acc in enumerate((0.80, 0.82, 0.84)):
        _test_run(tmp_path, "prism_two_sided", 3.0, seed, 0.01, acc)
    _test_run(tmp_path, "zeroshot", None, 0, None, 0.77)
    summary = llm_report.summarize(tmp_path)["rotten_tomatoes"]
    row = summary["prism_two_sided"]["3"]
    assert row["mean"] == pytest.approx(82.0) and row["std"] == pytest.approx(2.0) and row["seeds"] == [0, 1, 2]
    assert summary["zeroshot"]["inf"]["std"] is None
    text = llm_report.table(llm_report.summarize(tmp_path))
    assert "| rotten_tomatoes | test accuracy (%) | prism_two_sided | 0.01 | 82.0 ± 2.0 (n=3) |  |" in text
    assert text.splitlines()[0] == "| task | metric | method | lr | eps 3 | no DP |"


def test_llm_report_pairs_prism_with_each_baseline_seed_by_seed(tmp_path):
    for seed, (prism_acc, naive_acc) in enumerate(((0.84, 0.82), (0.80, 0.79), (0.83, 0.80))):
        _test_run(tmp_path, "prism_two_sided", 3.0, seed, 0.003, prism_acc)
        _test_run(tmp_path, "naive", 3.0, seed, 0.001, naive_acc)
    _test_run(tmp_path, "ffa", 3.0, 1, 0.003, 0.81)  # one seed only: paired on that seed
    _test_run(tmp_path, "nonprivate", None, 0, 0.0003, 0.9)  # not private: no pair
    pairs = llm_report.paired(llm_report.summarize(tmp_path))["rotten_tomatoes"]["3"]
    assert set(pairs) == {"naive", "ffa"}
    assert pairs["naive"]["differences"] == pytest.approx([2.0, 1.0, 3.0])
    assert pairs["naive"]["mean"] == pytest.approx(2.0) and pairs["naive"]["std"] == pytest.approx(1.0)
    assert pairs["ffa"] == dict(mean=pytest.approx(-1.0), std=None, differences=[pytest.approx(-1.0)], seeds=[1])
    row = "| rotten_tomatoes | 3 | prism_two_sided | naive | +2.00 ± 1.00 (n=3) | +2.00, +1.00, +3.00 |"
    assert row in llm_report.paired_table(llm_report.paired(llm_report.summarize(tmp_path)))


def test_llm_report_pairs_the_chat_benchmarks_prism_with_lower_perplexity_first(tmp_path):
    reference = next(source.prism for source in llm_report.SOURCES if source.task == "chat (SFT)")
    for method, ppl in ((reference, 25.0), ("naive", 27.0), ("ffa", 24.0)):
        common.write_json(tmp_path / "llm_sft" / "test" / f"{method}_eps8_seed0.json",
                          dict(method=method, target_epsilon=8.0, seed=0, lr=0.003, test_perplexity=ppl))
    pairs = llm_report.paired(llm_report.summarize(tmp_path))
    assert pairs["chat (SFT)"]["8"]["naive"]["differences"] == [-2.0]
    rows = [line for line in llm_report.paired_table(pairs).splitlines() if line.startswith("| chat")]
    assert rows == [f"| chat (SFT) | 8 | {reference} | naive | -2.00 (n=1) | -2.00 |",
                    f"| chat (SFT) | 8 | {reference} | ffa | +1.00 (n=1) | +1.00 |"]


def test_llm_report_refuses_one_method_tested_at_two_learning_rates(tmp_path):
    _test_run(tmp_path, "naive", 3.0, 0, 0.01, 0.8)
    _test_run(tmp_path, "naive", 3.0, 1, 0.03, 0.8)
    with pytest.raises(ValueError, match="several learning rates"):
        llm_report.summarize(tmp_path)
