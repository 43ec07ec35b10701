"""prism.examples.chat's held-out scoring, which benchmarks.llm_sft reports: per reply and pooled."""

import pytest

from benchmarks.tests.test_synthetic import smollm2_or_skip


def test_per_reply_nll_does_not_depend_on_the_batch_and_pools_to_the_completion_loss():
    smollm2_or_skip()
    from prism.examples import chat
    from prism.examples.synthetic import load_base

    tokenizer, model = load_base(quick=True)
    pairs = [("hello there", "hi"), ("what is the film about", "a long trip across the country by train"),
             ("ok", "fine")]
    sums, counts = chat.completion_nll(model, tokenizer, pairs, batch_size=3)
    one_by_one = [chat.completion_nll(model, tokenizer, [pair], batch_size=1) for pair in pairs]
    assert sums == pytest.approx([s[0] for s, _ in one_by_one], rel=1e-4)
    assert counts == [c[0] for _, c in one_by_one] and counts[1] > counts[0]
    assert chat.completion_loss(model, tokenizer, pairs) == pytest.approx(sum(sums) / sum(counts), rel=1e-6)


def _run(method, nll, tokens):
    return dict(method=method, test_reply_nll=nll, test_reply_tokens=tokens)


def test_paired_loss_difference_is_the_pooled_difference_with_the_paired_standard_error():
    import statistics

    from benchmarks.llm_sft import paired_loss_difference

    a, b = [2.0, 3.5, 1.0, 4.0], [1.5, 3.0, 2.0, 2.5]
    diff, se = paired_loss_difference(_run("a", a, [1] * 4), _run("b", b, [1] * 4), "test")
    d = [x - y for x, y in zip(a, b)]  # one token per reply: the mean difference and its standard error
    assert diff == pytest.approx(statistics.mean(d)) and se == pytest.approx(statistics.stdev(d) / 2)
    tokens = [2, 4, 1, 3]  # differences proportional to the tokens: the pooled difference holds exactly
    diff, se = paired_loss_difference(_run("a", [0.5 * t for t in tokens], tokens), _run("b", [0.0] * 4, tokens),
                                      "test")
    assert diff == pytest.approx(0.5) and se == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="different test replies"):
        paired_loss_difference(_run("a", a, [1] * 4), _run("b", b, [1, 2, 1, 1]), "test")


def _scored(method, eps, lr, val, test=None, seed=0):
    run = dict(method=method, target_epsilon=eps, seed=seed, lr=lr, val_loss=sum(val) / len(val),
               val_reply_nll=val, val_reply_tokens=[1] * len(val))
    if test is not None:
        run.update(test_loss=sum(test) / len(test), test_reply_nll=test, test_reply_tokens=[1] * len(test))
    return run


def test_the_paired_table_takes_each_method_at_its_best_validation_rate_across_stages(tmp_path):
    from benchmarks import common
    from benchmarks.llm_sft import paired_table, run_path

    runs = {"test": [_scored("naive", 3.0, 0.01, [1.0, 2.0, 3.0], test=[1.0, 1.0, 1.0]),
                     _scored("prism", 3.0, 0.01, [1.5, 2.5, 3.5], test=[1.2, 1.1, 1.3]),
                     _scored("naive", 8.0, 0.01, [1.0, 1.0, 1.0])],
            "tune": [_scored("prism", 3.0, 0.003, [1.2, 2.1, 3.3]),  # prism's better validation rate
                     _scored("nonprivate", None, 0.003, [0.5, 1.4, 2.7]),
                     _scored("ffa", 3.0, 0.003, [0.0, 0.0, 0.0], seed=1)]}  # no naive run of seed 1: no row
    for stage, stage_runs in runs.items():
        for r in stage_runs:
            common.write_json(run_path(tmp_path, stage, r["method"], r["target_epsilon"], r["seed"], r["lr"]), r)
    rows = paired_table(tmp_path).splitlines()[2:]
    assert rows == ["| val | 3 | 0 | nonprivate | 0.003 | -0.4667 +- 0.0882 | -5.3 |",
                    "| val | 3 | 0 | prism | 0.003 | +0.2000 +- 0.0577 | +3.5 |",
                    "| val | 8 | 0 | nonprivate | 0.003 | +0.5333 +- 0.6386 | +0.8 |",
                    "| test | 3 | 0 | prism | 0.01 | +0.2000 +- 0.0577 | +3.5 |"]


def test_the_chat_example_builds_each_init_without_changing_the_model_and_refuses_an_unknown_one():
    smollm2_or_skip()
    import torch

    from prism.examples import chat
    from prism.layers import find_trainables

    pairs = [("hello there", "hi")]
    torch.manual_seed(0)
    tokenizer, default = chat.build_model(8, "default")
    reference = chat.completion_nll(default, tokenizer, pairs)[0]
    assert all(float(p.lora_B.weight.abs().max()) == 0.0 for p in find_trainables(default)[0])
    torch.manual_seed(0)
    _, balanced = chat.build_model(8, "balanced")
    svals = [torch.linalg.svdvals(p.lora_B.weight.detach()) for p in find_trainables(balanced)[0]]
    assert all(torch.allclose(s, torch.full_like(s, 3 ** -0.5), atol=1e-5) for s in svals)  # the balanced scale
    assert chat.completion_nll(balanced, tokenizer, pairs)[0] == pytest.approx(reference, rel=1e-4)  # compensated
    with pytest.raises(ValueError, match="choose one of pissa, balanced, default"):
        chat.build_model(8, "olora")
