"""The Hugging Face Trainer integration: a vanilla Trainer made private with prism.hf.make_private."""

import functools
import math
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import T5Config, T5ForConditionalGeneration

import prism
import prism.hf
import prism.losses
from helpers import (VOCAB, StopAt, TensorDataset, make_batch, private_settings, select, tiny_base, tiny_model,
                     token_halves, trainer_for)
from prism import NaiveDPLoRA, PRISM

pytestmark = pytest.mark.filterwarnings("ignore:TrainingArguments.max_grad_norm")


def test_trainer_learns_and_logs_epsilon(tmp_path):
    train, test = token_halves(2048, 0), token_halves(256, 1)
    model = tiny_model("bert", r=4, hidden=32, num_labels=2, dtype=torch.float32)
    opt = PRISM(model, **private_settings(2048, target_epsilon=8.0, expected_batch_size=128, steps=40, lr=0.05),
                generator=torch.Generator().manual_seed(3))
    trainer = trainer_for(model, opt, train, tmp_path, logging_steps=10, lr_scheduler_type="constant")
    prism.hf.make_private(trainer, sampling_seed=5)  # seeded: a test must not fail by chance
    assert trainer.args.max_steps == 40 and trainer.args.max_grad_norm == 0
    metrics = trainer.train().metrics
    assert trainer.state.global_step == opt.steps_taken == 40
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and all("epsilon" in e for e in logs)
    assert not any(key in e for e in trainer.state.log_history for key in prism.hf.UNNOISED_LOG_KEYS)
    assert [e["epsilon"] for e in logs] == sorted(e["epsilon"] for e in logs)
    assert metrics["epsilon"] == pytest.approx(opt.privacy_spent()[0]) and 7.5 < metrics["epsilon"] <= 8.0
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"]
    with torch.no_grad():
        accuracy = (model(input_ids=test["input_ids"]).logits.argmax(-1) == test["labels"]).float().mean()
    assert accuracy > 0.85


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("cls", [PRISM, NaiveDPLoRA])
def test_causal_lm_through_the_trainer(kind, cls, tmp_path):
    """A learnable language (each token is followed by its successor) through the Trainer: the loss on it
    falls (on random tokens there would be nothing to learn and the outcome would depend on the noise draw)."""
    data = make_batch(kind, 256, seed=3)
    start = data["input_ids"][:, :1]
    successors = (start - 1 + torch.arange(data["input_ids"].shape[1])) % (VOCAB - 1) + 1
    data["input_ids"] = successors * data["attention_mask"]
    data["labels"] = torch.where(data["attention_mask"].bool(), data["input_ids"], -100)
    model = tiny_model(kind, dtype=torch.float32, init="pissa" if cls is PRISM else True)
    opt = cls(model, **private_settings(256, noise_multiplier=0.3, expected_batch_size=32, steps=12, lr=0.05),
              generator=torch.Generator().manual_seed(2))
    trainer = trainer_for(model, opt, data, tmp_path, logging_steps=5)
    prism.hf.make_private(trainer, sampling_seed=4)
    before = mean_causal_lm_loss(model, data)
    trainer.train()
    after = mean_causal_lm_loss(model, data)
    assert after < before - 0.01
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(e["epsilon"] > 0 for e in logs) and opt.steps_taken == 12


@torch.no_grad()
def mean_causal_lm_loss(model, data) -> float:
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    return prism.per_example_causal_lm_loss(logits, data["labels"]).mean().item()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_per_example_loss_ignores_padding_and_other_examples(kind):
    """The loss make_private installs is the mean of each example's own loss, whatever the padding."""
    model = tiny_model(kind)
    opt = PRISM(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    loss_fn = prism.hf.default_per_example_loss(model)
    batch = make_batch(kind, 4, T=9, seed=5)
    loss = prism.hf.per_example_compute_loss(opt, loss_fn, model, batch)
    alone = []
    for i in range(4):
        length = int(batch["attention_mask"][i].sum())
        example = {k: v[i:i + 1, :length] if v.dim() == 2 else v[i:i + 1] for k, v in batch.items()}
        alone.append(prism.hf.per_example_compute_loss(opt, loss_fn, model, example))
    assert torch.allclose(loss, torch.stack(alone).mean(), rtol=1e-10)


def test_the_default_causal_loss_is_per_example_with_left_padding():
    """Left padding: each example's loss is the same alone (unpadded) as in the batch, so the batch's longest
    example does not reach it (the first token, predicted from padding in the batch, is not counted)."""
    model = tiny_model("llama")
    opt = PRISM(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    default = prism.hf.default_per_example_loss(model)
    seen = []

    @functools.wraps(default)  # a wrapper that keeps what the default loss declares about itself
    def loss_fn(outputs, labels):
        seen.append(default(outputs, labels))
        return seen[-1]

    def losses_of(examples):
        prism.hf.per_example_compute_loss(opt, loss_fn, model, examples)
        return seen[-1]

    batch = make_batch("llama", 4, T=9, seed=5)
    lengths = batch["attention_mask"].sum(1)
    left = {k: torch.stack([torch.roll(row, int(9 - n)) for row, n in zip(v, lengths)]) for k, v in batch.items()}
    assert (left["attention_mask"][:, 0] == 0).any()
    in_batch = losses_of(left).detach()
    alone = [losses_of({k: v[i:i + 1, 9 - n:] for k, v in left.items()}).detach()
             for i, n in enumerate(lengths.tolist())]
    assert torch.allclose(in_batch, torch.cat(alone), rtol=1e-9)
    logits = model(input_ids=left["input_ids"], attention_mask=left["attention_mask"]).logits
    plain = prism.per_example_causal_lm_loss(logits, left["labels"], attention_mask=left["attention_mask"])
    assert torch.allclose(plain, in_batch, rtol=1e-12)
    opt.remove_hooks()


def test_an_encoder_decoder_model_trains_through_the_trainer(tmp_path):
    """T5 builds its decoder inputs from the labels, which the model no longer gets: make_private's loss
    builds them (labels shifted right), and each example's loss is its own decoder tokens' mean."""
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, dropout_rate=0.0, decoder_start_token_id=0,
                                               pad_token_id=0))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], init_lora_weights="pissa",
                                            task_type="SEQ_2_SEQ_LM")).double()
    g = torch.Generator().manual_seed(1)
    data = dict(input_ids=torch.randint(1, VOCAB, (64, 6), generator=g), attention_mask=torch.ones(64, 6).long(),
                labels=torch.randint(1, VOCAB, (64, 4), generator=g))
    data["labels"][:8, 2:] = -100
    opt = PRISM(model, **private_settings(64, noise_multiplier=1.0, expected_batch_size=16, steps=3))
    batch = select(data, slice(0, 12))
    loss = prism.hf.per_example_compute_loss(opt, prism.hf.default_per_example_loss(model), model, batch)
    opt.zero_grad()
    with torch.no_grad():
        decoder_input_ids = base._shift_right(batch["labels"])
        logits = model(input_ids=batch["input_ids"], decoder_input_ids=decoder_input_ids).logits
    assert torch.allclose(loss, prism.losses.per_example_token_loss(logits, batch["labels"]).mean(), rtol=1e-10)
    trainer = trainer_for(model, opt, data, tmp_path)
    prism.hf.make_private(trainer, sampling_seed=1)
    trainer.train()
    assert opt.steps_taken == 3 and 0 < opt.privacy_spent()[0] < math.inf


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_eval_loss_is_the_models_own_after_make_private(tmp_path, reduction):
    """Evaluation keeps the Trainer's loss (a causal LM's token mean), comparable with non-private runs,
    whatever the training reduction; a given per-example loss is averaged over the batch."""
    model = tiny_model("gpt2", dtype=torch.float32)
    opt = PRISM(model, **private_settings(64, noise_multiplier=1.0, expected_batch_size=16, steps=3,
                                          loss_reduction=reduction))
    trainer = trainer_for(model, opt, make_batch("gpt2", 64, seed=4), tmp_path, per_device_eval_batch_size=8)
    held_out = TensorDataset(make_batch("gpt2", 16, seed=6))
    before = trainer.evaluate(held_out)["eval_loss"]
    prism.hf.make_private(trainer, sampling_seed=1)
    assert trainer.evaluate(held_out)["eval_loss"] == pytest.approx(before, rel=1e-6)
    trainer = trainer_for(model, opt, make_batch("gpt2", 64, seed=4), tmp_path, per_device_eval_batch_size=8)
    per_example = prism.hf.default_per_example_loss(model)
    prism.hf.make_private(trainer, per_example_loss=per_example, sampling_seed=1)
    with torch.no_grad():
        batch = make_batch("gpt2", 16, seed=6)
        expected = per_example(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                               batch["labels"]).mean()
    assert trainer.evaluate(held_out)["eval_loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("num_labels, make_labels", [
    (3, lambda g: torch.randint(0, 3, (5,), generator=g)),
    (3, lambda g: torch.randint(0, 2, (5, 3), generator=g).double()),  # multi-hot: multi-label BCE
    (1, lambda g: torch.randn(5, generator=g, dtype=torch.float64)),
])
def test_the_default_sequence_loss_infers_the_problem_type_as_the_model_does(num_labels, make_labels):
    """With config.problem_type unset, Hugging Face picks the loss from the labels inside the forward
    pass, which no longer gets them: prism's default loss must pick the same one."""
    model = tiny_model("bert", num_labels=num_labels)
    batch = make_batch("bert", 5, seed=1)
    labels = make_labels(torch.Generator().manual_seed(2))
    assert model.config.problem_type is None
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ours = prism.hf.default_per_example_loss(model)(out, labels)
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    torch.testing.assert_close(ours.mean(), theirs)


@pytest.mark.parametrize("dtype, loss_dtype", [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_per_example_losses_are_computed_in_at_least_fp32(dtype, loss_dtype):
    logits, labels = torch.randn(3, 4, 5).to(dtype), torch.randint(0, 5, (3, 4))
    assert prism.losses.per_example_token_loss(logits, labels).dtype == loss_dtype
    assert prism.losses.per_example_sequence_loss(logits[:, 0], labels[:, 0]).dtype == loss_dtype


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_gradient_of_one_example_is_independent_of_its_micro_batch(kind):
    """g(j with others) - g(others) = g(j alone), with other lengths, paddings and a trainer-style
    loss scale (1/3) that watch_loss must divide out. The summed gradients are read off a noiseless
    DP-SGD step that clips nothing: with lr 1 and b 1 it moves the parameters by minus their sum."""
    batch = make_batch(kind, 5, T=9, seed=8)
    others = make_batch(kind, 3, T=6, seed=9)

    def clipped_sums(examples):
        model = tiny_model(kind)
        trained = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in trained]
        opt = NaiveDPLoRA(model, lr=1.0, noise_multiplier=0.0, max_grad_norm=1e6, expected_batch_size=1,
                          adaptive=False)
        loss = prism.hf.per_example_compute_loss(opt, prism.hf.default_per_example_loss(model), model, examples)
        (loss / 3).backward()
        opt.step()
        return [b - p.detach() for b, p in zip(before, trained)]

    j = select(batch, slice(0, 1))
    pad = torch.zeros(1, 9 - 6, dtype=torch.long)
    padded_others = {k: torch.cat([v, pad.expand(3, -1) if k != "labels" else torch.full((3, 3), -100)], 1)
                     if v.dim() == 2 else v for k, v in others.items()}
    together = {k: torch.cat([j[k], padded_others[k]]) for k in j}
    with_others, without_j, j_alone = clipped_sums(together), clipped_sums(others), clipped_sums(j)
    for a, b, c in zip(with_others, without_j, j_alone):
        assert torch.allclose(a - b, c, atol=1e-6 * c.abs().max())  # fp64; GPT-2's attention mask costs digits


def test_watch_loss_divides_out_a_loss_scale():
    batch = make_batch("bert", 4, seed=2)
    norms = []
    for scale in (1.0, 1 / 3, 512.0):
        model = tiny_model("bert")
        opt = PRISM(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
        loss = prism.hf.per_example_compute_loss(opt, prism.hf.default_per_example_loss(model), model, batch)
        (loss * scale).backward()
        norms.append(opt.stats.last_norms)
        assert all(p.grad is None for p in opt.param_groups[0]["params"])  # the non-private gradient is dropped
    assert torch.allclose(norms[0], norms[1]) and torch.allclose(norms[0], norms[2])


def _train_with_checkpoints(output_dir, stop_at=None, resume_from=None):
    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, **private_settings(120, noise_multiplier=1.0, expected_batch_size=12, steps=6),
                generator=torch.Generator().manual_seed(7))
    trainer = trainer_for(model, opt, make_batch("bert", 120, seed=4), output_dir, save_strategy="steps",
                          save_steps=3, callbacks=[StopAt(stop_at)] if stop_at else None)
    prism.hf.make_private(trainer, sampling_seed=11)
    trainer.train(resume_from_checkpoint=resume_from)
    return model, opt


def test_resume_continues_epsilon_and_the_exact_next_steps(tmp_path):
    full_model, full_opt = _train_with_checkpoints(tmp_path / "full")
    _train_with_checkpoints(tmp_path / "cut", stop_at=3)
    model, opt = _train_with_checkpoints(tmp_path / "cut", resume_from=str(tmp_path / "cut" / "checkpoint-3"))
    assert opt.steps_taken == 6 and opt.accountant.steps == 6
    assert opt.get_epsilon() == full_opt.get_epsilon()
    for a, b in zip(model.state_dict().values(), full_model.state_dict().values()):
        assert torch.equal(a, b)


def test_saved_adapter_reproduces_the_model_on_the_original_base(tmp_path):
    """PiSSA moves part of W0 into the adapter; the export gives a plain LoRA for the original base."""
    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, **private_settings(64, noise_multiplier=1.0, expected_batch_size=16, steps=4, lr=0.1))
    trainer = trainer_for(model, opt, make_batch("bert", 64, seed=6), tmp_path / "run")
    prism.hf.make_private(trainer)
    trainer.train()
    prism.hf.save_adapter_for_base(trainer, tmp_path / "adapter")
    base, _ = tiny_base("bert")
    batch = make_batch("bert", 6, seed=1)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        before = base.eval()(**inputs).logits
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        expected, got = model.eval()(**inputs).logits, reloaded(**inputs).logits
    assert not torch.allclose(expected, before, atol=1e-3)  # it trained
    assert torch.allclose(got, expected, atol=1e-5)


def test_empty_micro_batches_still_step_and_account(tmp_path):
    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, **private_settings(200, noise_multiplier=1.0, expected_batch_size=2, steps=10))
    trainer = trainer_for(model, opt, make_batch("bert", 200, seed=2), tmp_path, gradient_accumulation_steps=4)
    callback = prism.hf.make_private(trainer, sampling_seed=0)
    trainer.train()
    assert opt.steps_taken == opt.accountant.steps == 10
    draws = [len(chunk) for chunk in prism.PoissonBatchSampler(200, 0.01, epochs=1, seed=0, micro_batches=4)]
    assert 0 in draws and callback.sampler.micro_batches == 4


def test_the_poisson_loader_keeps_the_trainers_worker_settings(tmp_path):
    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, **private_settings(200, noise_multiplier=1.0, expected_batch_size=8, steps=4))
    trainer = trainer_for(model, opt, make_batch("bert", 200, seed=2), tmp_path, dataloader_num_workers=2,
                          dataloader_persistent_workers=True, dataloader_prefetch_factor=3)
    prism.hf.make_private(trainer, sampling_seed=0)
    loader = trainer.get_train_dataloader()
    assert (loader.num_workers, loader.persistent_workers, loader.prefetch_factor) == (2, True, 3)


def test_max_epsilon_stops_training(tmp_path):
    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, **private_settings(200, noise_multiplier=1.5, expected_batch_size=20, max_epsilon=1.5))
    trainer = trainer_for(model, opt, make_batch("bert", 200, seed=2), tmp_path, max_steps=200)
    prism.hf.make_private(trainer)
    trainer.train()
    assert 0 < trainer.state.global_step < 200
    assert opt.privacy_spent()[0] <= 1.5 and not opt.budget_allows_another_step()


def test_checkpoint_optimizer_state_loads_with_weights_only(tmp_path):
    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, **private_settings(100, noise_multiplier=1.0, expected_batch_size=10))
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    state = torch.load(os.fspath(tmp_path / "optimizer.pt"), weights_only=True)
    assert state["prism"]["steps_taken"] == 1


@pytest.mark.parametrize("method", ["prism", "nonprivate"])
def test_main_job_runs_through_the_trainer(method, tmp_path, capsys):
    """The README's main job, shortened: real MiniLM and Rotten Tomatoes, a few steps."""
    from prism.examples import sentiment

    result = sentiment.main(["--method", method, "--steps", "2", "--batch-size", "16", "--micro-batch", "8",
                             "--test-size", "64", "--epsilon", "8", "--output-dir", str(tmp_path / "out"),
                             "--save-adapter", str(tmp_path / "adapter"), "--head-max-grad-norm", "10"])
    printed = capsys.readouterr().out
    assert 0 <= result["accuracy"] <= 1 and "test accuracy" in printed
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")
    if method == "prism":
        assert result["epsilon"] <= 8.0 and "privacy spent: epsilon" in printed
        assert "head_max_grad_norm=10.0" in printed


@pytest.mark.parametrize("cls", [PRISM, NaiveDPLoRA])
def test_clipped_sums_of_an_unfinished_step_are_dropped(cls):
    """After the drop a noiseless step is that of an optimizer that saw no example."""
    def noiseless_step(examples):
        model = tiny_model("bert")
        opt = cls(model, lr=0.1, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
        callback = prism.hf.PrivacyCallback(opt, prism.PoissonBatchSampler(100, 0.04, epochs=1, seed=0))
        if examples is not None:
            prism.hf.per_example_compute_loss(opt, prism.hf.default_per_example_loss(model), model,
                                              examples).backward()  # ...and the step never comes (an exception)
            with pytest.warns(RuntimeWarning, match="unfinished step"):
                callback.on_step_begin(None, None, None)
            assert opt.stats.backward_passes == 0
        opt.step()
        return [p.detach() for p in model.parameters() if p.requires_grad]

    dropped, nothing = noiseless_step(make_batch("bert", 3)), noiseless_step(None)
    assert all(torch.equal(a, b) for a, b in zip(dropped, nothing))


@pytest.mark.parametrize("init, mutates", [(True, False), ("gaussian", False), ("pissa", True),
                                           ("pissa_niter_4", True), ("olora", True)])
def test_which_inits_need_the_initial_adapter_to_export(init, mutates):
    from prism.export import mutates_base
    model = tiny_model("bert", init=init if init != "olora" else "gaussian")
    model.peft_config["default"].init_lora_weights = init
    assert mutates_base(model) is mutates


