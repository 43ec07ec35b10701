"""TRL's SFTTrainer made private by prism.hf.make_private: prompt-completion and conversational data, the
loss per example (completion-only and assistant-only), examples independent through SFTTrainer's
collator, refusals, gradient checkpointing, resume. Tiny random Llama and a word-level tokenizer built
here (no downloads; conftest.py sets HF_HUB_OFFLINE, which also silences SFTTrainer's telemetry)."""

import pytest

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'prism[trl]')")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import prism  # noqa: E402
import prism.hf  # noqa: E402
from helpers import StopAt, tiny_model  # noqa: E402
from prism import PRISM  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

WORDS = list("abcdefghijklmnopqrstuvwxyz")
SPECIAL = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
# assistant turns inside {% generation %}, so that assistant_only_loss can find them
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {% generation %}"
                 "{{ m['content'] }} <eos>{% endgeneration %} {% else %}<|user|> {{ m['content'] }} {% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def tokenizer() -> PreTrainedTokenizerFast:
    """31 tokens (the tiny Llama has 40): one per letter, split on whitespace, with a chat template."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _words(g, low, high):
    return " ".join(WORDS[i] for i in torch.randint(0, 26, (int(torch.randint(low, high + 1, (1,), generator=g)),),
                                                    generator=g))


def dataset(kind: str, n: int, seed: int = 0) -> Dataset:
    """`n` examples: "prompt-completion" text, "chat" (conversational prompt-completion) or "messages"."""
    g = torch.Generator().manual_seed(seed)
    pairs = [(_words(g, 2, 5), _words(g, 1, 4)) for _ in range(n)]
    if kind == "prompt-completion":
        return Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [" " + c for _, c in pairs]})
    turns = [([{"role": "user", "content": p}], [{"role": "assistant", "content": c}]) for p, c in pairs]
    if kind == "chat":
        return Dataset.from_dict({"prompt": [p for p, _ in turns], "completion": [c for _, c in turns]})
    return Dataset.from_dict({"messages": [p + c for p, c in turns]})


def sft_trainer(model, data, tmp_path, opt=None, callbacks=None, **config):
    settings = dict(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", max_length=16,
                    per_device_train_batch_size=8, gradient_accumulation_steps=2, logging_steps=2, save_strategy="no",
                    disable_tqdm=True, gradient_checkpointing=False, max_grad_norm=0.0, lr_scheduler_type="constant")
    settings.update(config)
    return SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=data, processing_class=tokenizer(),
                      optimizers=(opt, None), callbacks=callbacks)


def private_opt(model, n, **extra):
    settings = dict(lr=0.05, max_grad_norm=1.0, delta=1e-5, dataset_size=n, expected_batch_size=16, steps=4,
                    noise_multiplier=1.0, generator=torch.Generator().manual_seed(3))
    return PRISM(model, **{**settings, **extra})


def trained(model):
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("kind, config, target", [("prompt-completion", {}, 8.0),
                                                  ("messages", dict(assistant_only_loss=True), None)])
def test_sft_trainer_trains_privately_with_the_planned_epsilon(kind, config, target, tmp_path):
    model = tiny_model("llama", dtype=torch.float32)
    opt = private_opt(model, 64, **(dict(target_epsilon=target, noise_multiplier=None) if target else {}))
    trainer = sft_trainer(model, dataset(kind, 64), tmp_path, opt, **config)
    callback = prism.hf.make_private(trainer, sampling_seed=5)
    before = trained(model)
    metrics = trainer.train().metrics
    assert trainer.state.global_step == opt.steps_taken == 4 and callback.probe.done
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all("epsilon" in e for e in logs)
    # SFTTrainer's entropy, token accuracy and token count of the private batches are not logged
    assert not any(key in e for e in trainer.state.log_history for key in prism.hf.UNNOISED_LOG_KEYS)
    assert metrics["epsilon"] == pytest.approx(opt.privacy_spent()[0]) and metrics["epsilon"] > 0
    if target:  # calibrated to the target: spent in full after the planned steps, never more
        assert 7.5 < metrics["epsilon"] <= target
    assert all(not torch.equal(a, b) for a, b in zip(before, trained(model)))
    assert "eval_loss" in trainer.evaluate(dataset(kind, 8, seed=9))  # SFTTrainer's own loss, on other data


def test_a_custom_per_example_loss_and_label_smoothing_use_the_full_logits(tmp_path):
    """per_example_loss=... and label_smoothing_factor go through the model's logits (prism.losses); the
    default goes through SFTTrainer's fused head. All three are per-example means over the completion."""
    data, losses = dataset("prompt-completion", 64), {}
    custom = lambda outputs, labels: 2 * prism.per_example_causal_lm_loss(outputs.logits, labels)  # noqa: E731
    for name, loss, config in (("fused", None, {}), ("custom", custom, {}),
                               ("smoothed", None, dict(label_smoothing_factor=0.1))):
        model = tiny_model("llama", dtype=torch.float64)
        trainer = sft_trainer(model, data, tmp_path / name, private_opt(model, 64), **config)
        prism.hf.make_private(trainer, per_example_loss=loss, check_examples=False)
        batch = _collate(trainer, range(4))
        losses[name] = trainer.compute_loss(model, batch).item()  # the training loss: mean of the per-example losses
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        smoothed = prism.per_example_causal_lm_loss(logits, batch["labels"], label_smoothing=0.1).mean().item()
    assert losses["custom"] == pytest.approx(2 * losses["fused"], rel=1e-6)  # the fused head computes in fp32
    assert losses["smoothed"] == pytest.approx(smoothed, rel=1e-12) and abs(losses["smoothed"] - losses["fused"]) > 1e-3


def _collate(trainer, indices, data=None):
    data = trainer.train_dataset if data is None else data
    return trainer.data_collator([{k: data[i][k] for k in ("input_ids", "labels")} for i in indices])


@torch.no_grad()
def _completion_loss_by_hand(model, batch):
    """Mean next-token cross-entropy over the positions whose label is not -100, from the full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return token.sum(1) / (labels != -100).sum(1)


@pytest.mark.parametrize("kind, config", [("prompt-completion", {}), ("messages", dict(assistant_only_loss=True))])
def test_each_examples_loss_is_its_mean_over_its_completion_tokens(kind, config, tmp_path):
    model = tiny_model("llama", dtype=torch.float32)
    trainer = sft_trainer(model, dataset(kind, 8), tmp_path, **config)
    batch = _collate(trainer, range(6))
    tok = tokenizer()
    prompt_lengths = [len(tok.apply_chat_template(ex["messages"][:1], add_generation_prompt=True, return_dict=True)
                          ["input_ids"]) if kind == "messages" else len(tok(ex["prompt"])["input_ids"])
                      for ex in trainer.train_dataset.select(range(6))]
    real = batch["attention_mask"].bool()
    for row, length in enumerate(prompt_lengths):  # prompt (and user turn) tokens carry no label; the rest do
        assert (batch["labels"][row, :length] == -100).all()
        assert (batch["labels"][row, length:][real[row, length:]] != -100).all()
    with torch.no_grad():
        losses = prism.hf.sft_per_example_loss(model, batch)
    torch.testing.assert_close(losses, _completion_loss_by_hand(model, batch), rtol=1e-5, atol=1e-6)
    every_token = dict(batch, labels=torch.where(real, batch["input_ids"], -100))
    assert (losses - _completion_loss_by_hand(model, every_token)).abs().min() > 1e-3  # the prompt would count
    with torch.no_grad():  # one example alone: SFTTrainer's own loss (a token mean) is that example's loss
        one = _collate(trainer, [0])
        assert SFTTrainer.compute_loss(trainer, model, one).item() == pytest.approx(losses[0].item(), rel=1e-5)


def test_changing_one_example_changes_no_other_examples_loss_or_gradient(tmp_path):
    """Through SFTTrainer's collator: batches that differ in their last example (another length, so
    another padded width and token count) give the other examples the same losses and per-example
    gradient norms, and the clipped sums are additive over examples. SFTTrainer's own loss (a token
    mean over the micro-batch) fails the same check."""
    model = tiny_model("llama", dtype=torch.float64)
    opt = PRISM(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1e6, delta=1e-5, dataset_size=64,
                expected_batch_size=8, steps=4)
    trainer = sft_trainer(model, dataset("prompt-completion", 64, seed=1), tmp_path, opt)
    prism.hf.make_private(trainer, check_examples=False)
    lengths = [int((torch.tensor(ex["labels"]) != -100).sum()) for ex in trainer.train_dataset]
    last = next(i for i in range(5, 64) if lengths[i] != lengths[4] and len(trainer.train_dataset[i]["input_ids"])
                != len(trainer.train_dataset[4]["input_ids"]))

    def run(indices, loss=trainer.compute_loss):
        batch = _collate(trainer, indices)
        with torch.no_grad():
            losses = prism.hf.sft_per_example_loss(model, batch)
        loss(model, batch).backward()
        norms, sums = opt.stats.last_norms.clone(), opt.clipped_sums()
        opt.zero_grad()
        return losses, norms, sums

    (losses_a, norms_a, sums_a), (losses_b, norms_b, _) = run([0, 1, 2, 3, 4]), run([0, 1, 2, 3, last])
    torch.testing.assert_close(losses_a[:4], losses_b[:4], rtol=1e-10, atol=0)
    torch.testing.assert_close(norms_a[:4], norms_b[:4], rtol=1e-8, atol=0)
    assert abs(losses_a[4] - losses_b[4]) > 1e-3 and abs(norms_a[4] - norms_b[4]) > 1e-3 * norms_a[4]
    _, _, sums_others = run([0, 1, 2, 3])
    _, _, sums_alone = run([4])
    for name, blocks in sums_a.items():
        for together, others, alone in zip(blocks, sums_others[name], sums_alone[name]):
            # the fused head computes in fp32; the subtraction's rounding scales with the larger sum
            scale = max(together.abs().max(), alone.abs().max())
            torch.testing.assert_close(together - others, alone, rtol=0, atol=1e-6 * scale)
    # the check can fail: SFTTrainer's token mean over the micro-batch couples the examples
    _, own_a, _ = run([0, 1, 2, 3, 4], loss=lambda m, b: SFTTrainer.compute_loss(trainer, m, b))
    _, own_b, _ = run([0, 1, 2, 3, last], loss=lambda m, b: SFTTrainer.compute_loss(trainer, m, b))
    assert not torch.allclose(own_a[:4], own_b[:4], rtol=1e-3)


class _OwnStepSFTTrainer(SFTTrainer):
    def training_step(self, *args, **kwargs):
        return super().training_step(*args, **kwargs)


@pytest.mark.parametrize("change, match", [
    (dict(config=dict(packing=True)), r"packing=True.*SFTConfig\(packing=False, padding_free=False\)"),
    (dict(config=dict(padding_free=True, max_length=None)),
     r"padding-free.*SFTConfig\(packing=False, padding_free=False\)"),
    (dict(args=dict(activation_offloading=True)), "activation_offloading"),
    (dict(config=dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})),
     "use_reentrant"),
    (dict(cls=_OwnStepSFTTrainer), "_OwnStepSFTTrainer overrides training_step.*trl.SFTTrainer"),
    (dict(opt=dict(dataset_size=80)), "train_dataset has 64 examples.*SFTTrainer drops"),
])
def test_settings_that_put_several_examples_in_a_row_or_break_the_loss_are_refused(change, match, tmp_path):
    model = tiny_model("llama", dtype=torch.float32)
    opt = private_opt(model, **{"n": 64, **change.get("opt", {})}) if "opt" in change else private_opt(model, 64)
    settings = {**dict(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", max_length=16,
                       gradient_checkpointing=False), **change.get("config", {})}
    trainer = change.get("cls", SFTTrainer)(model=model, args=SFTConfig(**settings), optimizers=(opt, None),
                                            train_dataset=dataset("prompt-completion", 64),
                                            processing_class=tokenizer())
    for name, value in change.get("args", {}).items():
        setattr(trainer.args, name, value)
    with pytest.raises((ValueError, TypeError), match=match):
        prism.hf.make_private(trainer)


@pytest.mark.parametrize("name", ["DPOTrainer", "GRPOTrainer", "RewardTrainer", "KTOTrainer", "RLOOTrainer"])
def test_other_trl_trainers_are_refused_by_name(name):
    trainer = object.__new__(getattr(trl, name))  # the refusal looks at the class only
    with pytest.raises(TypeError, match=rf"does not support TRL's {name}: .*Supported: transformers.Trainer and "
                                        r"trl.SFTTrainer"):
        prism.hf.make_private(trainer)


def _two_private_steps(tmp_path, checkpointing):
    model = tiny_model("llama", dtype=torch.float32)
    opt = private_opt(model, 64, steps=2)
    trainer = sft_trainer(model, dataset("chat", 64), tmp_path, opt, max_steps=2, gradient_checkpointing=checkpointing)
    prism.hf.make_private(trainer, sampling_seed=2)
    trainer.train()
    assert model.get_base_model().is_gradient_checkpointing == checkpointing
    return trained(model)


def test_gradient_checkpointing_through_sft_trainer_gives_the_same_steps(tmp_path):
    """SFTConfig's default (gradient_checkpointing=True, non-reentrant) trains as without it."""
    with_checkpoints = _two_private_steps(tmp_path / "on", True)
    for a, b in zip(with_checkpoints, _two_private_steps(tmp_path / "off", False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _train(output_dir, stop_at=None, resume_from=None):
    model = tiny_model("llama", dtype=torch.float32)
    opt = private_opt(model, 64, steps=4)
    trainer = sft_trainer(model, dataset("prompt-completion", 64), output_dir, opt, save_strategy="steps", save_steps=2,
                          callbacks=[StopAt(stop_at)] if stop_at else None)
    prism.hf.make_private(trainer, sampling_seed=11)
    trainer.train(resume_from_checkpoint=resume_from)
    return model, opt


def test_resume_from_a_checkpoint_continues_epsilon_and_the_steps(tmp_path):
    full_model, full_opt = _train(tmp_path / "full")
    _, cut_opt = _train(tmp_path / "cut", stop_at=2)
    assert cut_opt.steps_taken == 2 and cut_opt.get_epsilon() < full_opt.get_epsilon()
    model, opt = _train(tmp_path / "cut", resume_from=str(tmp_path / "cut" / "checkpoint-2"))
    assert opt.steps_taken == 4 and opt.get_epsilon() == full_opt.get_epsilon()
    for a, b in zip(model.state_dict().values(), full_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
