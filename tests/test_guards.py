"""Misuse that would silently break the per-example bound must raise or be neutralised
(regressions found in review)."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForMultipleChoice, OPTConfig, OPTForCausalLM

from helpers import VOCAB, current_factors, make_batch, per_example_losses, select, tiny_model
from prism import NaiveDPLoRA, PRISM, PoissonBatchSampler
from prism import accounting
from prism.manifold import split_tangent

BASE = dict(lr=0.01, noise_multiplier=0.0, max_grad_norm=1e-3, expected_batch_size=4, loss_reduction="sum")


def _released_norms(opt):
    """Global norm of the clipped sum each unit would release (tangent blocks + dense tensors)."""
    total = 0.0
    sums = opt.clipped_sums()
    for k, pair in enumerate(opt.pairs):
        _, _, basis = current_factors(opt, k)
        S, U, V = split_tangent(*(s.double() for s in sums.pop(pair.name)), basis)
        total += S.square().sum() + U.square().sum() + V.square().sum()
    for dense_sums in sums.values():
        total += sum(s.double().square().sum() for s in dense_sums)
    return total.sqrt().item()


def _sums(opt):
    return [s for module_sums in opt.clipped_sums().values() for s in module_sums]


def _reference_sums(kind, batch):
    """Clipped sums of one plain forward/backward pass on a fresh model."""
    model = tiny_model(kind)
    opt = PRISM(model, **BASE)
    per_example_losses(kind, model, batch).sum().backward()
    return _sums(opt)


def test_non_reentrant_checkpointing_is_exact_and_reentrant_is_refused():
    batch = make_batch("llama", b=3, seed=1)
    reference = _reference_sums("llama", batch)
    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = PRISM(model, **BASE)
    per_example_losses("llama", model, batch).sum().backward()
    assert opt.stats.examples == 3 and opt.stats.backward_passes == 1
    for a, b in zip(_sums(opt), reference):
        torch.testing.assert_close(a, b)

    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    opt = PRISM(model, **BASE)
    model.enable_input_require_grads()
    with pytest.raises(RuntimeError, match="use_reentrant"):
        per_example_losses("llama", model, batch).sum().backward()


def test_checkpointing_frees_what_the_per_example_step_needs_until_the_backward_pass():
    """Under non-reentrant checkpointing the LoRA modules' inputs are saved like activations: dropped after
    the forward pass (not held by prism's hooks) and recomputed for the backward pass."""
    import gc
    import weakref

    model = tiny_model("llama", dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = PRISM(model, **BASE)
    inputs = []
    for pair in opt.pairs:
        pair.lora_A.register_forward_hook(lambda module, args, out: inputs.append(weakref.ref(args[0])))
    loss = per_example_losses("llama", model, make_batch("llama", b=3, seed=1)).sum()
    gc.collect()
    assert len(inputs) == len(opt.pairs) and all(ref() is None for ref in inputs)
    loss.backward()
    assert opt.stats.examples == 3 and opt.stats.last_norms.min() > 0


def test_one_backward_through_two_forward_passes_is_refused():
    model = tiny_model("bert")
    PRISM(model, **BASE)
    first = per_example_losses("bert", model, make_batch("bert", b=2, seed=1)).sum()
    second = per_example_losses("bert", model, make_batch("bert", b=2, seed=2)).sum()
    with pytest.raises(RuntimeError, match="two forward passes"):
        (first + second).backward()


def test_a_forward_pass_through_the_inner_model_is_refused():
    """The optimizer numbers the forward passes of the model it was given; a pass through the model
    inside it would go uncounted, and two such passes could merge their examples by position."""
    model = tiny_model("bert")
    PRISM(model, **BASE)
    with pytest.raises(RuntimeError, match="outside a forward pass"):
        per_example_losses("bert", model.get_base_model(), make_batch("bert", b=2))


def multiple_choice_model():
    """BERT multiple choice runs (batch * choices) rows through its encoder."""
    base = BertForMultipleChoice(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32, max_position_embeddings=32))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights="pissa"))
    return model, dict(input_ids=torch.randint(1, VOCAB, (2, 3, 5)))


def flattened_tokens_model():
    """OPT's MLP sees (batch * tokens, features)."""
    base = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["fc1"], init_lora_weights="pissa"))
    return model, dict(input_ids=torch.randint(1, VOCAB, (2, 5)))


class _ChannelsAsRows(torch.nn.Module):
    """A time-series model (as PatchTST) that runs each example's channels as separate rows."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, past_values):
        b, channels, features = past_values.shape
        return self.proj(past_values.reshape(b * channels, features)).reshape(b, -1).sum(1)


def channels_as_rows_model():
    """Called with a keyword input prism does not know by name (the Trainer passes every input so)."""
    model = get_peft_model(_ChannelsAsRows(), LoraConfig(r=2, target_modules=["proj"], init_lora_weights="pissa"))
    return model, dict(past_values=torch.randn(2, 3, 8))


@pytest.mark.parametrize("build", [multiple_choice_model, flattened_tokens_model, channels_as_rows_model])
def test_a_module_whose_rows_are_not_examples_is_refused(build):
    """Clipping the rows of a reshaped batch would clip parts of examples: one example could
    contribute several times C. The rows of every hooked module must be the forward pass's examples."""
    torch.manual_seed(0)
    model, inputs = build()
    PRISM(model, **BASE)
    with pytest.raises(RuntimeError, match="rows are not examples"):
        model(**inputs)


class _MaskedTagger(torch.nn.Module):
    """A per-token head whose output the model zeroes at padding, in place (as Wav2Vec2 does to its
    projector's output) or not; `bypass`: the head's weight applied without calling the head."""

    def __init__(self, in_place: bool = False, bypass: bool = False):
        super().__init__()
        self.in_place, self.bypass = in_place, bypass
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        hidden = self.proj(self.embed(input_ids))
        out = torch.nn.functional.linear(hidden, self.head.weight) if self.bypass else self.head(hidden)
        if self.in_place:
            out[attention_mask == 0] = 0.0
            return out
        return out * attention_mask[..., None]


def _masked_tagger_step(**options):
    """Per-example norms and clipped sums of one noiseless backward pass of a _MaskedTagger."""
    torch.manual_seed(0)
    model = get_peft_model(_MaskedTagger(**options), LoraConfig(r=2, target_modules=["proj"],
                                                                modules_to_save=["head"], init_lora_weights="pissa"))
    opt = PRISM(model, **BASE)
    batch = make_batch("llama", b=3, seed=1)
    (model(batch["input_ids"], batch["attention_mask"]).square().sum(-1) * torch.arange(1.0, 4.0)[:, None]).sum().backward()
    return opt.stats.last_norms.clone(), [s for sums in opt.clipped_sums().values() for s in sums]


def test_a_model_writing_into_a_hooked_output_in_place_trains_like_one_that_does_not():
    """The in-place write reaches the per-example stage as part of the output's gradient (hooked outputs
    are in-place identities in autograd), so the norms and clipped sums are those of the same mask
    applied out of place."""
    norms, sums = _masked_tagger_step(in_place=True)
    want_norms, want_sums = _masked_tagger_step(in_place=False)
    assert norms.shape == (3,) and norms.min() > 0
    torch.testing.assert_close(norms, want_norms)
    for got, want in zip(sums, want_sums, strict=True):
        torch.testing.assert_close(got, want)


def test_a_gradient_the_hooks_never_saw_is_refused_at_backward():
    with pytest.raises(RuntimeError, match="head.*: the parameters got a gradient .* never saw"):
        _masked_tagger_step(bypass=True)


def test_a_second_optimizer_on_a_privately_trained_model_warns():
    """Its accountant starts at zero while the model's privacy loss composes over both runs; hooks of
    the first optimizer left attached would keep collecting gradients."""
    model = tiny_model("bert")
    first = PRISM(model, **BASE)
    for _ in range(2):
        per_example_losses("bert", model, make_batch("bert", b=2)).sum().backward()
        first.step()
    with pytest.warns(UserWarning) as caught:
        PRISM(model, **BASE)
    messages = [str(w.message) for w in caught]
    assert any("already took 2 private steps" in m for m in messages)
    assert any("hooks are still attached" in m for m in messages)
    fresh = tiny_model("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PRISM(fresh, **BASE).remove_hooks()
        PRISM(fresh, **BASE)  # no step taken, hooks removed: nothing to warn about


def test_trainable_parameters_changed_after_building_are_refused():
    """A second adapter made active (or a layer unfrozen) after the optimizer was built has no hooks:
    its gradient would never be clipped, and the old adapter would get noise alone."""
    model = tiny_model("llama")
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian"))
    opt = PRISM(model, **BASE)
    model.base_model.set_adapter("second")
    per_example_losses("llama", model, make_batch("llama", b=2)).sum().backward()
    with pytest.raises(RuntimeError, match="trainable parameters changed.*second"):
        opt.step()
    assert opt.steps_taken == 0


def test_leftovers_of_a_failed_backward_are_discarded_not_merged():
    batch = make_batch("bert", b=2, seed=3)
    reference = _reference_sums("bert", batch)
    model = tiny_model("bert")
    opt = PRISM(model, **BASE)
    first_layer = model.base_model.model.bert.encoder.layer[0].output

    def fail(module, inputs, output):  # reached after layer 1's LoRA hooks fired, before layer 0's
        output.register_hook(lambda grad: (_ for _ in ()).throw(MemoryError("simulated OOM")))

    handle = first_layer.register_forward_hook(fail)
    with pytest.raises(MemoryError):
        per_example_losses("bert", model, make_batch("bert", b=2, seed=4)).sum().backward()
    handle.remove()
    with pytest.warns(RuntimeWarning, match="did not finish"):
        per_example_losses("bert", model, batch).sum().backward()
    assert opt.stats.examples == 2
    for a, b in zip(_sums(opt), reference):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore:.*trainable parameters are float16")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_released_contribution_of_one_example_is_within_C_in_low_precision(dtype):
    model = tiny_model("llama", dtype=dtype, hidden=32, r=4)  # no dense head: only the tangent blocks count
    opt = PRISM(model, **BASE)
    batch = make_batch("llama", b=6, seed=5)
    for i in range(6):
        opt.zero_grad()
        per_example_losses("llama", model, select(batch, slice(i, i + 1))).sum().backward()
        assert opt.stats.clipped == 1
        assert _released_norms(opt) <= BASE["max_grad_norm"] * (1 + 1e-6)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_bf16_autocast_keeps_per_example_norms_and_the_clip_bound(kind):
    """Under CPU bf16 autocast the hooks see bf16 activations; norms and sums are formed in fp32."""
    batch = make_batch(kind, b=5, seed=3)
    norms = []
    for autocast in (False, True):
        model = tiny_model(kind, dtype=torch.float32, hidden=32, r=4)
        opt = PRISM(model, **{**BASE, "max_grad_norm": 0.05})
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses = per_example_losses(kind, model, batch)
        losses.float().sum().backward()
        norms.append(opt.stats.last_norms)
        assert all(s.dtype == torch.float32 for s in _sums(opt))
        assert opt.stats.clipped == 5 and _released_norms(opt) <= 5 * 0.05 * (1 + 1e-5)
    torch.testing.assert_close(norms[1], norms[0], rtol=0.05, atol=0)


def test_fp16_trainables_warn_and_a_watched_scaled_loss_keeps_their_norms():
    batch = make_batch("bert", b=5, seed=3)
    norms = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = tiny_model("bert", dtype=dtype, hidden=32, r=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = PRISM(model, **BASE)
        fp16_warnings = [w for w in caught if "float16" in str(w.message)]
        assert len(fp16_warnings) == (dtype == torch.float16)
        loss = per_example_losses("bert", model, batch).sum()
        opt.watch_loss(loss)
        (loss * 1024).backward()
        norms[dtype] = opt.stats.last_norms
    torch.testing.assert_close(norms[torch.float16], norms[torch.float32], rtol=1e-2, atol=0)


def test_default_sampler_randomness_is_not_the_global_seed():
    torch.manual_seed(0)
    first = list(PoissonBatchSampler(100, 0.1, 5))
    torch.manual_seed(0)
    second = list(PoissonBatchSampler(100, 0.1, 5))
    assert first != second


def test_max_steps_within_checks_its_cap(monkeypatch):
    monkeypatch.setattr(accounting, "MAX_STEPS", 10)
    steps = accounting.max_steps_within(9.91, 1e-5, 1.0, 0.5)
    assert accounting.epsilon_for(1.0, 0.5, steps, 1e-5)[2] <= 9.91 < accounting.epsilon_for(1.0, 0.5, steps + 1,
                                                                                               1e-5)[2]


@pytest.mark.parametrize("cls", [PRISM, NaiveDPLoRA])
def test_an_adapter_no_gradient_reaches_is_refused_after_three_steps(cls):
    """Examples go through the model, but the loss does not depend on them (here: multiplied by 0, as
    when every label is -100): the clipped sums stay zero, and the third such step raises."""
    model = tiny_model("bert", init="pissa" if cls is PRISM else True)
    opt = cls(model, **{**BASE, "noise_multiplier": 1.0})
    batch = make_batch("bert", b=4)
    for step in range(3):
        (0 * per_example_losses("bert", model, batch)).sum().backward()
        if step < 2:
            opt.step()
    with pytest.raises(RuntimeError, match="no gradient reached the trained parameters"):
        opt.step()
    assert opt.steps_taken == 2


def test_warm_up_at_lr_0_and_empty_batches_do_not_trip_the_dead_adapter_guard():
    model = tiny_model("bert")
    opt = PRISM(model, **{**BASE, "lr": 0.0, "noise_multiplier": 1.0})
    batch = make_batch("bert", b=4)
    for _ in range(4):
        per_example_losses("bert", model, batch).sum().backward()
        opt.step()
    for _ in range(4):
        opt.step()  # empty Poisson batches: nothing forwarded
    assert opt.steps_taken == 8
