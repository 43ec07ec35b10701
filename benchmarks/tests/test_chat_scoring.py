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
