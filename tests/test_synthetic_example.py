"""prism.examples.synthetic end to end in quick mode (a tiny random Llama with SmolLM2's tokenizer, 2 private
steps, 8 samples), and its refusals of bad input."""

import json

import pytest

pytest.importorskip("trl", reason="TRL is not installed (pip install 'prism[trl]')")

from prism.examples import synthetic  # noqa: E402
from prism.examples.synthetic_data import SENTIMENT, Template  # noqa: E402
from prism.examples.synthetic_sampling import SamplingConfig, sample_balanced  # noqa: E402

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
    assert len(rows) == 8 and sorted(r["label"] for r in rows) == ["negative"] * 4 + ["positive"] * 4
    assert all(r["text"] and r["text"] == r["text"].strip() and "\n" not in r["text"] for r in rows)
    assert len({" ".join(r["text"].lower().split()) for r in rows}) == 8  # no duplicates
    generator = result["generator"]
    assert generator["method"] == "prism" and generator["steps_taken"] == 2
    assert 7.0 < generator["epsilon"] <= 8.0  # calibrated to the target, upper bound reported
    assert result["sampling"]["kept"] == 8 and result["sampling"]["generated"] >= 8
    printed = capsys.readouterr().out
    assert "generator step 2/2" in printed and "epsilon 7." in printed and "sampling positive: 4/4" in printed
    card = json.loads((tmp_path / "synthetic.card.json").read_text())  # the record released beside the samples
    assert card["generator"]["epsilon"] == generator["epsilon"] and card["samples"] == 8
    assert card["generator"]["template"] == dict(labels=["negative", "positive"], field="Sentiment", body="Review")


def test_quick_workflow_passes_the_init_and_the_metric_to_prism(tmp_path):
    smollm2_or_skip()
    result = synthetic.main(["--quick", "--init", "balanced", "--metric", "balanced", "--samples", "2",
                             "--out", str(tmp_path / "s.jsonl"), "--threads", "1"])
    generator = result["generator"]
    assert generator["config"]["init"] == "balanced" and generator["metric"] == "balanced"
    assert generator["steps_taken"] == 2 and 7.0 < generator["epsilon"] <= 8.0


def test_the_prompt_carries_the_label():
    assert SENTIMENT.prompt(1) == "Sentiment: positive\nReview:" and SENTIMENT.prompt(0).endswith("negative\nReview:")
    assert SENTIMENT.labels == ("negative", "positive") and SENTIMENT.scaffolding == ("sentiment:", "review:")
    assert SENTIMENT.reading_prompt == ("Review: ", "\nSentiment:", (" negative", " positive"))
    notes = Template(labels=("cardiology", "oncology", "other"), field="Department", body="Note")
    assert notes.prompt(2) == "Department: other\nNote:" and notes.classes == 3
    free = Template(labels=None, body="Message")
    assert free.prompt() == "Message:" and free.classes == 1 and free.scaffolding == ("message:",)
    with pytest.raises(ValueError, match="no label"):
        free.prompt(1)
    with pytest.raises(ValueError, match="no labels to read"):
        free.reading_prompt


@pytest.mark.parametrize("kwargs, message", [
    (dict(labels=("yes",)), "at least 2 distinct"),
    (dict(labels=("yes", "yes")), "at least 2 distinct"),
    (dict(labels=("yes", " no")), "without surrounding spaces"),
    (dict(labels=("yes", "")), "non-empty"),
    (dict(field="Label:"), "without ':'"),
    (dict(body=""), "non-empty words"),
])
def test_template_refuses_what_would_garble_the_prompt(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Template(**kwargs)


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_a_corpus_file_is_read_with_its_public_label_names(tmp_path):
    from prism.examples.synthetic_data import load_corpus

    three = Template(labels=("0", "1", "spam"))
    path = write_lines(tmp_path / "c.jsonl", [dict(text=" hello there ", label=1), "",
                                             dict(text="buy now", label="spam"), dict(text="see you", label="0")])
    assert load_corpus(path, three) == (["hello there", "buy now", "see you"], [1, 2, 0])
    free = write_lines(tmp_path / "free.jsonl", [dict(text="one"), dict(text="two")])
    assert load_corpus(free, Template(labels=None)) == (["one", "two"], None)


@pytest.mark.parametrize("rows, template, message", [
    (["{not json"], SENTIMENT, "line 1: not JSON"),
    ([dict(label="positive")], SENTIMENT, 'line 1: needs a non-empty string "text"'),
    ([dict(text="fine", label="positive"), dict(text="  ", label="negative")], SENTIMENT, "line 2: needs"),
    ([dict(text="fine", label="neutral")], SENTIMENT, "must be one of the label names given"),
    ([dict(text="fine", label=True)], Template(labels=("True", "False")), "must be one of the label names"),
    ([dict(text="fine", label="positive")], Template(labels=None), "no label names were given"),
    ([], SENTIMENT, "holds no examples"),
])
def test_a_bad_corpus_is_refused_with_the_line_and_the_fix(tmp_path, rows, template, message):
    from prism.examples.synthetic_data import load_corpus

    with pytest.raises(ValueError, match=message) as caught:
        load_corpus(write_lines(tmp_path / "bad.jsonl", rows), template)
    assert "neutral" not in str(caught.value)  # the error does not echo a private label


def test_quick_workflow_on_a_users_corpus_with_three_labels_and_unconditionally(tmp_path):
    smollm2_or_skip()
    rows = [dict(text=f"message number {i} about {topic}", label=topic)
            for i in range(20) for topic in ("billing", "delivery", "refund")]
    data = write_lines(tmp_path / "tickets.jsonl", rows)
    out = tmp_path / "synthetic.jsonl"
    result = synthetic.main(["--quick", "--data", str(data), "--labels", "billing", "delivery", "refund",
                             "--field", "Topic", "--body", "Ticket", "--samples", "6", "--out", str(out),
                             "--threads", "1"])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["label"] for r in written) == ["billing"] * 2 + ["delivery"] * 2 + ["refund"] * 2
    card = json.loads(synthetic.card_path(out).read_text())
    assert card["generator"]["train_size"] == 60 and 7.0 < card["generator"]["epsilon"] <= 8.0
    assert card["generator"]["template"] == dict(labels=["billing", "delivery", "refund"], field="Topic", body="Ticket")
    assert card["sampling"]["settings"]["scaffolding"] == ["topic:", "ticket:"]

    free = write_lines(tmp_path / "notes.jsonl", [dict(text=r["text"]) for r in rows])
    result = synthetic.main(["--quick", "--data", str(free), "--samples", "3", "--out", str(out), "--threads", "1"])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 3 and all(set(r) == {"text"} for r in written)
    assert result["generator"]["template"]["labels"] is None


@pytest.mark.parametrize("argv, message", [
    (["--labels", "a", "b"], "describe --data"),
    (["--data", "{data}", "--labels", "a", "b", "c", "--samples", "4"], "multiple of the 3 labels"),
    (["--data", "{data}", "--label-filter"], "needs --labels"),
    (["--data", "{data}"], "no label names were given"),
    (["--data", "{missing}", "--labels", "a", "b"], "No such file"),
    (["--quick", "--model", "gpt2"], "drop --model"),
])
def test_the_command_refuses_inconsistent_data_options(tmp_path, capsys, argv, message):
    data = write_lines(tmp_path / "d.jsonl", [dict(text="x y z", label="a")])
    argv = [a.format(data=data, missing=tmp_path / "missing.jsonl") for a in argv]
    with pytest.raises(SystemExit):
        synthetic.main(argv + ["--out", str(tmp_path / "o.jsonl")])
    assert message in capsys.readouterr().err


def test_the_judge_needs_labels_that_start_with_distinct_tokens():
    smollm2_or_skip()
    from prism.examples.synthetic_sampling import PublicLabelJudge

    tokenizer, model = synthetic.load_base(quick=True)
    with pytest.raises(ValueError, match="distinct tokens"):
        PublicLabelJudge(model, tokenizer, Template(labels=("very good", "very bad")))
    judge = PublicLabelJudge(model, tokenizer, Template(labels=("cardiology", "oncology"), field="Department",
                                                        body="Note"))
    assert (judge.prefix, judge.suffix) == ("Note: ", "\nDepartment:") and len(set(judge.answer_ids.tolist())) == 2
    assert all(p in (0, 1) for p in judge(["chest pain and an irregular heartbeat", "a new tumour on the scan"]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="prism", epsilon=None), "target epsilon"),
    (dict(method="nonprivate", epsilon=8.0), "epsilon=None"),
    (dict(method="dpsgd"), "method must be one of"),
    (dict(steps=0), "steps must be an integer > 0"),
    (dict(method="prism", init="default"), "PRISM needs full-rank factors"),
    (dict(init="olora"), "init must be one of"),
    (dict(method="naive", metric="balanced"), "PRISM's option"),
    (dict(metric="fisher"), "metric must be one of"),
])
def test_generator_config_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic.GeneratorConfig(**kwargs)


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="non-empty and of equal length"):
        synthetic.train_generator(["a"], [0, 1], synthetic.GeneratorConfig())
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        synthetic.train_generator(["a"], [2], synthetic.GeneratorConfig())
    with pytest.raises(ValueError, match="multiple of the number of labels"):
        sample_balanced(None, None, SENTIMENT.prompt, 3, SamplingConfig())
    with pytest.raises(ValueError, match="needs labels"):
        sample_balanced(None, None, Template(labels=None).prompt, 3, SamplingConfig(), labels=None, judge=len)
    with pytest.raises(ValueError, match="labels and template disagree"):
        synthetic.train_generator(["a"], None, synthetic.GeneratorConfig())
    with pytest.raises(SystemExit):
        synthetic.main(["--samples", "3", "--out", "x.jsonl"])


def test_sampling_gives_up_with_a_clear_error_when_nothing_passes_the_filters():
    smollm2_or_skip()
    tokenizer, model = synthetic.load_base(quick=True)  # untrained: never ends a sample
    config = SamplingConfig(max_new_tokens=4, batch_size=4, max_rounds=1)
    with pytest.raises(RuntimeError, match="passed the filters"):
        sample_balanced(model, tokenizer, SENTIMENT.prompt, 4, config)


def test_the_public_judge_reads_plain_sentiment_with_the_real_model():
    smollm2_or_skip()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prism.examples.synthetic_sampling import PublicLabelJudge
    from prism.pretrained import smollm2

    tokenizer = AutoTokenizer.from_pretrained(smollm2())
    judge = PublicLabelJudge(AutoModelForCausalLM.from_pretrained(smollm2()), tokenizer, batch_size=2)
    texts = ["A wonderful, moving film: I loved every minute of it.", "A dull, tedious mess and a waste of time.",
             "Brilliant acting and a beautiful story.", "The worst film of the year: boring and ugly."]
    assert judge(texts) == [1, 0, 1, 0]


def test_judge_filter_keeps_the_agreed_rows_balanced_and_reports_agreement():
    from prism.examples.synthetic_sampling import judge_filter

    rows = [dict(text=f"n{i}", label=0) for i in range(4)] + [dict(text=f"p{i}", label=1) for i in range(4)]
    verdicts = {"n0": 0, "n1": 1, "n2": 0, "n3": 0, "p0": 1, "p1": 0, "p2": 1, "p3": 0}
    kept, report = judge_filter(rows, lambda texts: [verdicts[t] for t in texts])
    assert [r["text"] for r in kept] == ["n0", "n2", "p0", "p2"]  # 3 negatives agreed, 2 positives: 2 each
    assert report == dict(per_label=dict(negative=dict(samples=4, agreed=3), positive=dict(samples=4, agreed=2)),
                          kept=4)


def test_sampling_with_a_judge_drops_what_it_reads_as_the_other_label():
    smollm2_or_skip()
    tokenizer, model = synthetic.load_base(quick=True)
    config = SamplingConfig.quick()
    with pytest.raises(RuntimeError, match="label mismatch"):  # a judge that reads everything as positive
        sample_balanced(model, tokenizer, SENTIMENT.prompt, 4, config, judge=lambda texts: [1] * len(texts))
    flips = iter(range(10 ** 6))
    rows, report = sample_balanced(model, tokenizer, SENTIMENT.prompt, 4, config,
                                   judge=lambda texts: [next(flips) % 2 for _ in texts])
    assert sorted(r["label"] for r in rows) == [0, 0, 1, 1] and report["dropped"]["label mismatch"] > 0
    with pytest.raises(ValueError, match="one label per text"):  # a judge that loses texts fails loudly
        sample_balanced(model, tokenizer, SENTIMENT.prompt, 4, config, judge=lambda texts: [0] * (len(texts) + 1))


def test_quick_workflow_with_the_label_filter_builds_a_judge_from_the_untuned_base(tmp_path, monkeypatch):
    smollm2_or_skip()
    built = []

    class AlternatingJudge:  # the tiny random base model reads everything alike: stand in for its verdicts
        def __init__(self, model, tokenizer, template):
            assert template == SENTIMENT
            built.append(model)
            self.count = 0

        def __call__(self, texts):
            self.count += len(texts)
            return [(self.count - len(texts) + i) % 2 for i in range(len(texts))]

    monkeypatch.setattr(synthetic, "PublicLabelJudge", AlternatingJudge)
    out = tmp_path / "synthetic.jsonl"
    result = synthetic.main(["--quick", "--label-filter", "--out", str(out), "--threads", "1"])
    assert len(built) == 1 and not hasattr(built[0], "peft_config")  # the base model, no adapter
    assert result["sampling"]["kept"] == 8 and result["sampling"]["dropped"]["label mismatch"] > 0
