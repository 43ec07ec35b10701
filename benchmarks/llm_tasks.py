"""The LLM benchmark's tasks, model and scoring: classification as text with SmolLM2.

benchmarks.tasks' fixed splits (so results compare like for like with benchmarks.utility) as
completion tasks, without the chat template:

    rotten_tomatoes  "Review: <review sentence>\\nSentiment:" -> " negative" | " positive"
    sms_spam         "Message: <SMS>\\nSpam or ham:"          -> " ham" | " spam"

In each task both answers are single tokens of SmolLM2's tokenizer (checked at load time), so the loss on the
answer only is the cross-entropy of one next-token prediction (over the whole vocabulary, the LM
head unchanged, no new head) and the prediction compares the two answer tokens' logits (= their
likelihoods). No chat template: it would add ~25 tokens of system prompt to every ~30-token example
(about twice the compute on these 2-core machines) for a task that is a plain continuation; the
instruct model continues this prompt with one of the two words in most cases (see the zero-shot row).

Sequences are right-padded; the answer is predicted at each example's last prompt token (the LM head
runs only on the few distinct last positions of a length-sorted micro-batch; last_token_logits). Each
example's loss depends on its own tokens only (the padding is masked and comes after it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from prism.examples.synthetic_data import SENTIMENT
from prism.examples.synthetic_sampling import last_token_logits

from . import tasks

TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Prompt:
    """A task as text: prefix + example + suffix, continued by answers[label]."""

    prefix: str
    suffix: str
    answers: tuple[str, str]  # label 0, 1


# Rotten Tomatoes: the public label judge's prompt (its zero-shot row measures the judge on real reviews)
PROMPTS = {"rotten_tomatoes": Prompt(*SENTIMENT.reading_prompt),
           "sms_spam": Prompt("Message: ", "\nSpam or ham:", (" ham", " spam"))}


@dataclass(frozen=True)
class Encoded:
    """Prompts as token ids (lists, unpadded) with labels 0/1."""

    ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Data:
    train: Encoded
    val: Encoded
    test: Encoded
    answer_ids: tuple[int, int]


def tokenizer_path(quick: bool):
    from prism.pretrained import smollm2

    return smollm2()


def load_data(tokenizer, max_length: int, batch_size: int, quick: bool = False, val_size: int | None = None,
              task: str = "rotten_tomatoes") -> Data:
    """benchmarks.tasks' split of `task` (train truncated to a multiple of `batch_size`), encoded as
    PROMPTS[task]; the validation split cut to its first `val_size` examples if given."""
    if task not in PROMPTS:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(PROMPTS)}")
    prompt = PROMPTS[task]
    split = tasks.load_task(task, batch_size, quick=quick)
    answer_ids = []
    for answer in prompt.answers:
        ids = tokenizer(answer, add_special_tokens=False).input_ids
        if len(ids) != 1:  # then the likelihood of an answer would be the sum over its tokens
            raise ValueError(f"{answer!r} is {len(ids)} tokens in this tokenizer; the scoring assumes one")
        answer_ids.append(ids[0])
    suffix = tokenizer(prompt.suffix, add_special_tokens=False).input_ids

    def encode(texts, labels):
        ids = [tokenizer(prompt.prefix + t, add_special_tokens=False).input_ids[:max_length - len(suffix)] + suffix
               for t in texts]
        return Encoded(ids, list(labels))

    val_x, val_y = split.val_x[:val_size], split.val_y[:val_size]
    return Data(encode(split.train_x, split.train_y), encode(val_x, val_y), encode(split.test_x, split.test_y),
                tuple(answer_ids))


def loss_sum(model, ids: list[list[int]], pad_id: int, targets: torch.Tensor) -> torch.Tensor:
    """Sum over the examples (prompts as token ids) of the answer token's cross-entropy (each term one
    example's own)."""
    return F.cross_entropy(last_token_logits(model, ids, pad_id), targets, reduction="sum")


@torch.no_grad()
def accuracy(model, enc: Encoded, answer_ids, pad_id: int, batch_size: int = 64) -> dict:
    """Accuracy (the answer with the larger likelihood wins), the balanced accuracy (the mean over labels of the
    share of that label's examples answered right: 1 / #answers for a model that always gives one answer, however
    skewed the labels), the share of each answer among the predictions, the mean answer loss over the two
    answers renormalised, and how often the unconstrained top-1 token is one of the two answers."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i]))  # batches of similar length: little padding
    top1 = 0
    loss = 0.0
    answers = torch.tensor(answer_ids)
    predicted, truth = [], []
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        logits = last_token_logits(model, [enc.ids[i] for i in index], pad_id)
        labels = torch.tensor([enc.labels[i] for i in index])
        pair = logits[:, answers]
        predicted.append(pair.argmax(-1))
        truth.append(labels)
        loss += float(F.cross_entropy(pair, labels, reduction="sum"))
        top1 += int(torch.isin(logits.argmax(-1), answers).sum())
    model.train(was_training)
    n = max(len(enc), 1)
    predicted, truth = (torch.cat(x) if x else torch.zeros(0, dtype=torch.long) for x in (predicted, truth))
    right = predicted == truth
    recalls = [right[truth == c].float().mean().item() for c in range(len(answer_ids)) if (truth == c).any()]
    return dict(accuracy=int(right.sum()) / n, balanced_accuracy=sum(recalls) / max(len(recalls), 1),
                predicted_share=[(predicted == c).float().mean().item() if len(predicted) else 0.0
                                 for c in range(len(answer_ids))],
                answer_loss=loss / n, top1_is_an_answer=top1 / n)


def load_model(quick: bool, init: str, rank: int = 8, alpha: float | None = None):
    """(tokenizer, peft model): SmolLM2-135M-Instruct (quick: a tiny random Llama with its vocabulary)
    with LoRA r on q_proj and v_proj, no dropout, scaling alpha / r (default alpha = r: delta W = Z).

    init: "pissa" (peft's "pissa_niter_4": the top-r part of W0 moved into the adapter, full-rank
    factors, the model output unchanged), "default" (peft's: lora_A random, lora_B = 0) or "balanced"
    (prism.init_balanced_lora: small random orthonormal factors, the base compensated).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tokenizer_path(quick)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if quick:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inits = {"pissa": "pissa_niter_4", "default": True, "balanced": True}
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=0.0, target_modules=list(TARGETS),
                        init_lora_weights=inits[init])
    model = get_peft_model(model, config)
    if init == "balanced":  # A = c Q1, B = c Q2, c = 1/sqrt(3), the base compensated (the output unchanged)
        import prism

        prism.init_balanced_lora(model, generator=torch.Generator().manual_seed(0))
    model.train()
    return tokenizer, model
