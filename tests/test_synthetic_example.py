"""prism.examples.synthetic end to end in quick mode (a tiny random Llama with SmolLM2's tokenizer, 2 private
steps, 8 samples), and its refusals of bad input."""

import json

import pytest

pytest.importorskip("trl", reason="TRL is not installed (pip install 'prism[trl]')")

from prism.examples import synthetic  # noqa: E402
from prism.examples.synthetic_sampling import LABELS, SamplingConfig, sample_balanced  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def smollm2_or_skip():
    from prism.pretrained import smollm2

    try:
        return smollm2()
    except ImportError as exc:
        pytest.skip(str(exc))


def test_quick_workflow_trains_privately_and_writes_balanced_filtered_samples(tmp_path, capsys):
    smollm2_or_skip()
    out = tmp_path / "synthetic.jsonl"
    result = synthetic.main(["--quick", "--epsilon", "8", "--out", str(out), "--threads", "1"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and sorted(r["label"] for r in rows) == [0] * 4 + [1] * 4
    assert all(r["text"] and r["text"] == r["text"].strip() and "\n" not in r["text"] for r in rows)
    assert len({" ".join(r["text"].lower().split()) for r in rows}) == 8  # no duplicates
    generator = result["generator"]
    assert generator["method"] == "prism" and generator["steps_taken"] == 2
    assert 7.0 < generator["epsilon"] <= 8.0  # calibrated to the target, upper bound reported
    assert result["sampling"]["kept"] == 8 and result["sampling"]["generated"] >= 8
    printed = capsys.readouterr().out
    assert "generator step 2/2" in printed and "epsilon 7." in printed and "sampling positive: 4/4" in printed


def test_the_prompt_carries_the_label():
    assert synthetic.prompt(1) == "Sentiment: positive\nReview:" and synthetic.prompt(0).endswith("negative\nReview:")
    assert LABELS == ("negative", "positive")


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="prism", epsilon=None), "target epsilon"),
    (dict(method="nonprivate", epsilon=8.0), "epsilon=None"),
    (dict(method="dpsgd"), "method must be one of"),
    (dict(steps=0), "steps must be an integer > 0"),
])
def test_generator_config_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic.GeneratorConfig(**kwargs)


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="non-empty and of equal length"):
        synthetic.train_generator(["a"], [0, 1], synthetic.GeneratorConfig())
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        synthetic.train_generator(["a"], [2], synthetic.GeneratorConfig())
    with pytest.raises(ValueError, match="even number"):
        sample_balanced(None, None, synthetic.prompt, 3, SamplingConfig())
    with pytest.raises(SystemExit):
        synthetic.main(["--samples", "3", "--out", "x.jsonl"])


def test_sampling_gives_up_with_a_clear_error_when_nothing_passes_the_filters():
    smollm2_or_skip()
    tokenizer, model = synthetic.load_base(quick=True)  # untrained: never ends a sample
    config = SamplingConfig(max_new_tokens=4, batch_size=4, max_rounds=1)
    with pytest.raises(RuntimeError, match="passed the filters"):
        sample_balanced(model, tokenizer, synthetic.prompt, 4, config)
