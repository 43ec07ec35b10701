"""The one-off probe (optimizer.check_examples): layouts whose row COUNT equals the batch but whose rows
are not examples, and models that mix examples, are refused; ordinary models pass untouched."""

import warnings

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F
from transformers import BertConfig, BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

import prism
import prism.hf
from helpers import KINDS, VOCAB, TensorDataset, make_batch, per_example_losses, stack_collate, tiny_model
from prism import PRISM
from prism.probe import RowsAreNotExamples, replace_examples

BASE = dict(lr=0.01, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4, loss_reduction="sum")
FEATURES = 8


def lora(module: torch.nn.Module, targets: list[str], **extra):
    torch.manual_seed(0)
    return get_peft_model(module, LoraConfig(r=2, target_modules=targets, init_lora_weights="pissa", **extra))


class _ClassPrompts(torch.nn.Module):
    """CLIP-style zero-shot classification: a text tower encodes one fixed prompt per class (as many
    classes as images here), and each image's logits are its similarities to every class."""

    def __init__(self, classes: int):
        super().__init__()
        self.register_buffer("prompts", torch.randn(classes, FEATURES))
        self.image_proj = torch.nn.Linear(FEATURES, FEATURES)
        self.text_proj = torch.nn.Linear(FEATURES, FEATURES)

    def forward(self, pixel_values):
        return self.image_proj(pixel_values) @ self.text_proj(self.prompts).T


class _ImagesPerExample(torch.nn.Module):
    """Llava-style: a vision projector runs over all images of the batch, which belong to the examples
    unevenly (here: every image to example 0)."""

    def __init__(self):
        super().__init__()
        self.vision_proj = torch.nn.Linear(FEATURES, FEATURES)
        self.head = torch.nn.Linear(FEATURES, 3)

    def forward(self, text, images):
        owner = torch.zeros(images.shape[0], dtype=torch.long)
        per_example = torch.zeros_like(text).index_add(0, owner, self.vision_proj(images))
        return self.head(text + per_example)


class _Experts(torch.nn.Module):
    """Mixture of experts: a router sends the batch's b highest-scoring tokens (of b x T) to one expert."""

    def __init__(self):
        super().__init__()
        self.router = torch.nn.Linear(FEATURES, 1)
        self.expert = torch.nn.Linear(FEATURES, FEATURES)

    def forward(self, x):
        b, T, _ = x.shape
        tokens = x.reshape(b * T, FEATURES)
        chosen = self.router(tokens).squeeze(-1).topk(b).indices
        out = tokens.index_add(0, chosen, self.expert(tokens[chosen]))
        return out.reshape(b, T, FEATURES).sum((1, 2))


class _SequenceFirst(torch.nn.Module):
    """Takes (time, batch, features): its rows are time steps, as many as the examples here."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(FEATURES, FEATURES)

    def forward(self, x):
        return self.proj(x).sum((0, 2))


class _BatchNormBeforeHead(torch.nn.Module):
    """BatchNorm in training mode normalises each example with statistics of the whole batch."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(FEATURES, FEATURES)
        self.norm = torch.nn.BatchNorm1d(FEATURES)
        self.proj = torch.nn.Linear(FEATURES, FEATURES)
        self.head = torch.nn.Linear(FEATURES, 3)

    def forward(self, input_ids):
        return SequenceClassifierOutput(logits=self.head(self.proj(self.norm(self.embed(input_ids)))))


class _SpecAugmented(torch.nn.Module):
    """Masks time steps with numpy draws made example by example over each example's own length (as
    Wav2Vec2's SpecAugment does): the draws of later examples depend on earlier examples' lengths."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(FEATURES, FEATURES)
        self.head = torch.nn.Linear(FEATURES, 3)

    def forward(self, x, lengths):
        keep = torch.ones(x.shape[:2])
        for i, length in enumerate(lengths.tolist()):
            keep[i, np.random.choice(length, size=2, replace=False)] = 0.0
        hidden = torch.nn.functional.dropout(self.proj(x * keep[..., None]), 0.3, self.training)
        return self.head(hidden.mean(1))


def _probe(model, batch, loss, probes=4):
    PRISM(model, **BASE).check_examples(batch, loss, probes=probes)


def test_class_prompts_in_a_lora_text_tower_are_refused():
    """The text tower's rows are classes; every image's loss reaches all of them."""
    b = 4
    model = lora(_ClassPrompts(classes=b), ["text_proj"])
    labels = torch.arange(b) % 2
    with pytest.raises(RowsAreNotExamples, match="text_proj.*loss of example 0 reaches row"):
        _probe(model, dict(pixel_values=torch.randn(b, FEATURES)),
               lambda m, batch: F.cross_entropy(m(**batch), labels, reduction="none"))


def test_images_that_belong_to_one_example_are_refused():
    model = lora(_ImagesPerExample(), ["vision_proj"], modules_to_save=["head"])
    batch = (torch.randn(3, FEATURES), torch.randn(3, FEATURES))
    with pytest.raises(RowsAreNotExamples, match="vision_proj.*loss of example 0 reaches row"):
        _probe(model, batch, lambda m, batch: m(*batch).logsumexp(-1))


def test_an_expert_that_gets_as_many_tokens_as_examples_is_refused():
    model = lora(_Experts(), ["expert"])
    with pytest.raises(RowsAreNotExamples, match="expert.*reaches row"):
        _probe(model, torch.randn(4, 5, FEATURES), lambda m, x: m(x))


def test_a_sequence_first_input_of_batch_length_is_refused():
    model = lora(_SequenceFirst(), ["proj"])
    with pytest.raises(RowsAreNotExamples, match="proj.*reaches row"):
        _probe(model, torch.randn(4, 4, FEATURES), lambda m, x: m(x))


def test_a_loss_with_in_batch_negatives_is_refused():
    """Contrastive loss: each example's loss is a softmax over its similarities to the whole batch."""
    model = lora(torch.nn.Sequential(torch.nn.Linear(FEATURES, FEATURES)), ["0"])
    x = torch.randn(4, FEATURES)

    def contrastive(m, x):
        z = m(x)
        return F.cross_entropy(z @ z.T, torch.arange(x.shape[0]), reduction="none")

    with pytest.raises(RowsAreNotExamples, match="loss of example 0 reaches row"):
        _probe(model, x, contrastive)


def test_batch_norm_before_a_trained_module_is_refused_and_its_statistics_are_restored():
    """Only the forward probe sees this: the gradient of each loss stays in its own row of `proj`."""
    model = lora(_BatchNormBeforeHead(), ["proj"], modules_to_save=["head"])
    norm = model.get_base_model().norm
    before = (norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone())
    x, labels = torch.randn(6, FEATURES), torch.arange(6) % 3
    opt = PRISM(model, **BASE)
    loss = lambda m, x: F.cross_entropy(m(x).logits, labels, reduction="none")  # noqa: E731
    with pytest.raises(RowsAreNotExamples, match=r"proj.*: changing example 5 changed row"):
        opt.check_examples(x, loss)
    assert all(torch.equal(a, b) for a, b in zip(before, (norm.running_mean, norm.running_var,
                                                         norm.num_batches_tracked)))
    model.eval()  # running statistics: each example is normalised alone
    with pytest.warns(UserWarning, match="eval mode"):
        opt.check_examples(x, loss)


@pytest.mark.parametrize("kind", KINDS)
def test_ordinary_models_pass_and_nothing_changes(kind):
    """Padding, attention masks and causal LM losses keep examples apart: no false alarm. The probe
    leaves no gradient, no accumulated sums, the parameters and the global random state as they were."""
    model = tiny_model(kind)
    opt = PRISM(model, **BASE)
    params = [p.detach().clone() for p in model.parameters()]
    batch = make_batch(kind, b=5, seed=2)
    rng, numpy_rng = torch.get_rng_state(), np.random.get_state()[1].copy()
    opt.check_examples(batch, lambda m, batch: per_example_losses(kind, m, batch), probes=5)
    assert torch.equal(torch.get_rng_state(), rng) and np.array_equal(np.random.get_state()[1], numpy_rng)
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert opt.stats.examples == 0 and opt.stats.backward_passes == 0 and opt.clipped_sums() == {}
    per_example_losses(kind, model, batch).sum().backward()  # the hooks work as before
    assert opt.stats.examples == 5


def _left_padded(batch: dict, first_label: bool = True) -> dict:
    """The same examples with their padding moved to the left (without the first token's label: it would
    be predicted from the padding, but only in examples shorter than the longest)."""
    lengths = batch["attention_mask"].sum(1)
    T = batch["attention_mask"].shape[1]
    left = {key: torch.stack([torch.roll(row, int(T - n)) for row, n in zip(value, lengths)])
            for key, value in batch.items()}
    if not first_label:
        left["labels"][torch.arange(len(lengths)), T - lengths] = -100
    return left


def _causal_losses(with_positions: bool):
    def loss(m, batch):
        extra = dict(position_ids=(batch["attention_mask"].cumsum(1) - 1).clamp(min=0)) if with_positions else {}
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
        return prism.per_example_causal_lm_loss(out.logits, batch["labels"])
    return loss


def test_losses_that_depend_on_the_left_padded_length_are_refused():
    """With left padding, the padded length (the batch's longest example) reaches each example's loss when
    GPT-2 numbers positions from the start of the padded row, and when the first token is predicted from
    the padding before it. Positions from the mask, or rotary ones, without that label, pass."""
    batch = make_batch("gpt2", b=4, seed=5)
    assert (batch["attention_mask"][:, -1] == 0).any()
    with pytest.raises(RowsAreNotExamples, match="one more padding column changed the loss"):
        _probe(tiny_model("gpt2"), _left_padded(batch, first_label=False), _causal_losses(with_positions=False))
    with pytest.raises(RowsAreNotExamples, match="one more padding column changed the loss of example.s. 0 "):
        _probe(tiny_model("llama"), _left_padded(batch), _causal_losses(with_positions=False))
    _probe(tiny_model("gpt2"), _left_padded(batch, first_label=False), _causal_losses(with_positions=True))
    _probe(tiny_model("llama"), _left_padded(batch, first_label=False), _causal_losses(with_positions=False))


def test_a_loss_averaged_over_padded_positions_is_refused():
    def padded_mean(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tokens = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none", ignore_index=-100)
        return tokens.mean(1)

    with pytest.raises(RowsAreNotExamples, match="padding column"):
        _probe(tiny_model("llama"), make_batch("llama", b=4, seed=6), padded_mean)


def test_dropout_is_not_mistaken_for_mixing():
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], lora_dropout=0.2,
                                            init_lora_weights="pissa", task_type="SEQ_CLS"))
    _probe(model, make_batch("bert", b=6), lambda m, batch: per_example_losses("bert", m, batch))


def test_random_masks_drawn_example_by_example_are_not_mistaken_for_mixing():
    model = lora(_SpecAugmented(), ["proj"], modules_to_save=["head"])
    batch = dict(x=torch.randn(5, 9, FEATURES), lengths=torch.tensor([9, 4, 7, 5, 6]))
    _probe(model, batch, lambda m, batch: m(**batch).logsumexp(-1))


def test_a_normaliser_counted_over_the_batch_is_refused():
    """Hugging Face's num_items_in_batch pattern: each token loss divided by the batch's label count."""
    model = tiny_model("llama")
    batch = make_batch("llama", b=4, seed=3)
    assert len(set((batch["labels"] != -100).sum(1).tolist())) > 1

    def loss(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        tokens = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
        return tokens.sum(1) / (labels != -100).sum()

    with pytest.raises(RowsAreNotExamples, match="changing example 3 changed the loss"):
        _probe(model, batch, loss)


def test_a_batch_statistic_is_refused_next_to_an_outlier():
    """Rows are compared at their own scale: an outlier loss elsewhere does not hide a small change."""
    model = tiny_model("bert", num_labels=1)
    batch = make_batch("bert", b=5, seed=4)
    batch["labels"] = torch.tensor([0.5, 1.0, 1000.0, -0.5, 0.0], dtype=torch.float64)

    def centred(m, batch):
        pred = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        return (pred - batch["labels"]).square() + 10.0 * (pred - pred.mean().detach()).square()

    with pytest.raises(RowsAreNotExamples, match="changed the loss"):
        _probe(model, batch, centred)


def test_batch_norm_is_refused_when_the_first_and_last_examples_are_duplicates():
    model = lora(_BatchNormBeforeHead(), ["proj"], modules_to_save=["head"])
    x = torch.randn(5, FEATURES)
    x[4] = x[0]
    labels = torch.arange(5) % 3
    with pytest.raises(RowsAreNotExamples, match="changing example 4"):
        _probe(model, x, lambda m, x: F.cross_entropy(m(x).logits, labels, reduction="none"))


def test_probing_under_no_grad_or_next_to_another_optimizer_still_checks():
    b = 4
    model = lora(_ClassPrompts(classes=b), ["text_proj"])
    labels = torch.arange(b) % 2
    loss = lambda m, batch: F.cross_entropy(m(batch), labels, reduction="none")  # noqa: E731
    first = PRISM(model, **BASE)
    with pytest.warns(UserWarning, match="hooks are still attached"):
        second = PRISM(model, **BASE)
    for opt in (first, second):
        with torch.no_grad(), pytest.raises(RowsAreNotExamples, match="reaches row"):
            opt.check_examples(torch.randn(b, FEATURES), loss)


def test_a_model_in_eval_mode_is_probed_as_it_is_with_a_warning():
    model = tiny_model("bert").eval()
    opt = PRISM(model, **BASE)
    loss = lambda m, batch: per_example_losses("bert", m, batch)  # noqa: E731
    with pytest.warns(UserWarning, match="eval mode"):
        opt.check_examples(make_batch("bert", b=3), loss)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.check_examples(make_batch("bert", b=3), loss)


def test_replace_examples_indexes_example_fields_only():
    shared = torch.randn(2, 3)
    batch = dict(x=torch.arange(4), texts=["a", "b", "c", "d"], shared=shared, nested=(torch.arange(4) * 10,),
                 array=np.arange(4))
    out = replace_examples(batch, torch.tensor([3, 1, 2, 3]), 4)
    assert out["x"].tolist() == [3, 1, 2, 3] and out["texts"] == ["d", "b", "c", "d"]
    assert out["shared"] is shared and out["nested"][0].tolist() == [30, 10, 20, 30]
    assert out["array"].tolist() == [3, 1, 2, 3]
    fields = [torch.arange(2), torch.arange(2) + 5]  # default_collate's list of fields, as many as examples
    assert [f.tolist() for f in replace_examples(fields, torch.tensor([0, 0]), 2)] == [[0, 0], [5, 5]]
    examples = [(torch.zeros(3), torch.tensor(0)), (torch.ones(3), torch.tensor(1))]  # identity collate
    assert replace_examples(examples, torch.tensor([1, 1]), 2)[0] is examples[1]
    records = [{"x": torch.zeros(3)}, {"x": torch.ones(3)}, {"x": torch.ones(3)}]
    assert replace_examples(records, torch.tensor([2, 1, 2]), 3)[0] is records[2]
    with pytest.raises(ValueError, match="cannot find the 4 examples"):
        replace_examples(dict(x=torch.zeros(3, 2)), torch.arange(4), 4)


def test_batch_norm_is_refused_whatever_the_batch_container():
    """A list of per-example tuples (an identity collate) must be changed example by example too."""
    model = lora(_BatchNormBeforeHead(), ["proj"], modules_to_save=["head"])
    opt = PRISM(model, **BASE)
    x, labels = torch.randn(5, FEATURES), torch.arange(5) % 3
    examples = list(zip(x, labels))

    def loss(m, batch):
        inputs, targets = torch.stack([e[0] for e in batch]), torch.stack([e[1] for e in batch])
        return F.cross_entropy(m(inputs).logits, targets, reduction="none")

    with pytest.raises(RowsAreNotExamples, match="changing example 4 changed row"):
        opt.check_examples(examples, loss)


def test_the_trainer_probes_the_first_batch(tmp_path):
    from transformers import Trainer, TrainingArguments
    n = 64
    data = dict(input_ids=torch.randn(n, FEATURES), labels=torch.arange(n) % 3)
    loss = lambda outputs, labels: F.cross_entropy(outputs.logits, labels, reduction="none")  # noqa: E731

    def train(check_examples: bool):
        model = lora(_BatchNormBeforeHead(), ["proj"], modules_to_save=["head"])
        opt = PRISM(model, lr=0.01, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=16, dataset_size=n,
                    delta=1e-5, steps=2)
        args = TrainingArguments(output_dir=str(tmp_path / str(check_examples)), per_device_train_batch_size=8, save_strategy="no",
                                 report_to="none", use_cpu=True, disable_tqdm=True, max_grad_norm=0.0,
                                 remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=TensorDataset(data), data_collator=stack_collate,
                          optimizers=(opt, None))
        prism.hf.make_private(trainer, per_example_loss=loss, sampling_seed=0, check_examples=check_examples)
        trainer.train()
        return opt

    with pytest.raises(RowsAreNotExamples, match=r"changing example \d+ changed"):
        train(check_examples=True)
    assert train(check_examples=False).steps_taken == 2
