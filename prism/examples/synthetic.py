"""Private synthetic text in one command: fine-tune a generator with DP, sample, release the samples.

    python -m prism.examples.synthetic --epsilon 8 --samples 2000 --out synthetic.jsonl
    python -m prism.examples.synthetic --data notes.jsonl --labels cardiology oncology --field Department \\
        --body Note --epsilon 8 --samples 1000 --out synthetic.jsonl        # your own data
    python -m prism.examples.synthetic --quick --out /tmp/synthetic.jsonl   # a tiny random model, seconds

Private data: `--data`, a JSON Lines file of {"text", "label"} (prism.examples.synthetic_data), with the label
names given publicly by `--labels` (none: unconditional generation); by default the Rotten Tomatoes training
sentences of the benchmarks' split (the sentences that are neither among the 2,000 test sentences nor the
1,000 validation ones of `load_rotten_tomatoes(2000, seed=0)`), with their labels. Each example is one
training text (synthetic_data.Template),

    "Sentiment: positive\\nReview:" + " <the review sentence><eos>"

(the loss on the text only; the label is in the prompt, so it is part of the example and protected
with it). The generator, SmolLM2-135M-Instruct (or `--model`) with LoRA r = 8 on q/k/v/o, is trained by a
vanilla TRL SFTTrainer made private with `prism.hf.make_private` (Poisson sampling, per-example losses, PRISM
with preconditioner="two_sided" or naive DP-LoRA; or non-privately, as a baseline). That training is the ONLY
access to the private data: sampling from the trained generator and filtering the samples are post-processing
(no privacy cost), and the filters (prism.examples.synthetic_sampling) use no private data;
`--label-filter` adds one that keeps the samples whose label the untuned public model, as a zero-shot
classifier, agrees with. The JSONL written holds {"text", "label" (its name)} per line and can be released at
the epsilon printed; `<out>.card.json` beside it records how it was made (epsilon, delta, method, steps,
sampling settings and filter counts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from .chat import INITS, with_lora
from .synthetic_data import SENTIMENT, Template, load_corpus
from .synthetic_sampling import PublicLabelJudge, SamplingConfig, sample_balanced

METHODS = ("prism", "naive", "nonprivate")
DEFAULT_LR = {"prism": 1e-2, "naive": 1e-2, "nonprivate": 1e-3}
DEFAULT_INIT = {"prism": "pissa", "naive": "default", "nonprivate": "default"}
METRICS = ("frobenius", "balanced")
VALIDATION_SIZE, TEST_SIZE = 1000, 2000  # the benchmarks' split (benchmarks.tasks.SIZES)


@dataclass(frozen=True)
class GeneratorConfig:
    """How the generator is trained (the defaults: the study's settings)."""

    method: str = "prism"
    epsilon: float | None = 8.0  # target epsilon at `delta` (None for method="nonprivate")
    delta: float = 1e-5
    steps: int = 30
    batch_size: int = 64  # expected logical batch b = q N
    micro_batch: int = 32
    lr: float | None = None  # default: DEFAULT_LR[method]
    max_grad_norm: float = 1.0
    rank: int = 8
    max_length: int = 64  # tokens per training example (prompt + review), longer ones truncated
    log_every: int = 5
    seed: int = 0  # the Trainer's seed (LoRA init); Poisson sampling and noise: see train_generator
    init: str | None = None  # the adapter's start (prism.examples.chat.with_lora); default: DEFAULT_INIT[method]
    metric: str = "frobenius"  # PRISM's clipping and noise metric (docs/method.md 3.7); PRISM only
    model: str | None = None  # the base causal LM (a local folder or hub name); None: SmolLM2-135M-Instruct

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if (self.epsilon is None) != (self.method == "nonprivate"):
            raise ValueError(f"method={self.method!r} needs " + ("epsilon=None" if self.method == "nonprivate"
                                                                 else "a target epsilon > 0"))
        if self.init is not None and self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.method == "prism" and self.lora_init == "default":
            raise ValueError("PRISM needs full-rank factors: init='default' (lora_B = 0) is refused; use 'pissa' or "
                             "'balanced'")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.metric != "frobenius" and self.method != "prism":
            raise ValueError(f"metric={self.metric!r} is PRISM's option; method={self.method!r} has none")
        for name in ("steps", "batch_size", "micro_batch", "rank", "max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be an integer > 0, got {getattr(self, name)!r}")

    @property
    def lora_init(self) -> str:
        return DEFAULT_INIT[self.method] if self.init is None else self.init

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else self.lr


def training_split() -> tuple[list[str], list[int]]:
    """The private training sentences and labels: benchmarks.tasks' Rotten Tomatoes split without its test
    and validation sentences (not truncated to a multiple of a batch size)."""
    from .sentiment import load_rotten_tomatoes

    rest_x, rest_y, _, _ = load_rotten_tomatoes(TEST_SIZE, seed=0)
    return rest_x[VALIDATION_SIZE:], rest_y[VALIDATION_SIZE:]


def load_base(quick: bool = False, model: str | None = None):
    """(tokenizer, causal LM): `model` (a folder or hub name; default SmolLM2-135M-Instruct), or with `quick` a
    tiny random Llama (2 layers, hidden 64) with SmolLM2's tokenizer, for tests: it trains and samples in
    seconds and produces noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from prism.pretrained import smollm2

    hf_logging.set_verbosity_error()
    path = smollm2() if model is None or quick else model
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # padding is masked: any id serves, and the end-of-sequence one exists
        tokenizer.pad_token = tokenizer.eos_token
    if quick:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return tokenizer, LlamaForCausalLM(config)
    return tokenizer, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def train_generator(texts: list[str], labels: list[int] | None, config: GeneratorConfig, *,
                    template: Template = SENTIMENT, quick: bool = False,
                    noise_generator: torch.Generator | None = None, sampling_seed: int | None = None):
    """Fine-tune the generator on (texts, labels: indices into template.labels, or None when the template is
    unconditional), each example template.prompt(label) + " " + text, and return (tokenizer, model, info).

    The private methods run a vanilla `trl.SFTTrainer` made private by `prism.hf.make_private`: each step
    draws a Poisson batch with rate q = b / N, clips each example's gradient to `max_grad_norm` and adds
    Gaussian noise calibrated so that `steps` steps spend at most `epsilon` at `delta` (upper bound of the PRV
    accountant). PRISM uses preconditioner="two_sided" (per-row moments: on a language model the one-sided r x r
    moments let a few outlier features set every row's step; benchmarks/results/llm) with `config.metric`, from
    `config.lora_init` (PiSSA by default; "balanced" with metric="balanced" is the next-token configuration that
    tied naive DP-LoRA on the chat task, docs/method.md 3.7).
    `noise_generator` and `sampling_seed` seed the noise and the Poisson draws for reproducible benchmark runs
    only; the default (OS entropy) is the one to deploy.

    info: method, epsilon spent (upper bound; None when non-private), noise multiplier, steps, N, lr, the
    training loss of the last logged steps and the training time.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import prism
    import prism.hf

    if (labels is None) != (template.labels is None):
        raise ValueError("labels and template disagree: give label indices with a labelled template, None with an "
                         "unconditional one (Template(labels=None))")
    if labels is None:
        labels = [None] * len(texts)
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"texts and labels must be non-empty and of equal length, got {len(texts)} and {len(labels)}")
    if template.labels is not None and set(labels) - set(range(template.classes)):
        raise ValueError(f"labels must lie in 0..{template.classes - 1}, got {sorted(set(labels))}")
    tokenizer, model = load_base(quick, config.model)
    model = with_lora(model, config.rank, config.lora_init)
    micro_batches = max(1, math.ceil(config.batch_size / config.micro_batch))
    dataset = Dataset.from_dict({"prompt": [template.prompt(y) for y in labels],
                                 "completion": [" " + t.strip() for t in texts]})
    with tempfile.TemporaryDirectory() as output_dir:
        args = SFTConfig(output_dir=output_dir, max_steps=config.steps, learning_rate=config.learning_rate,
                         lr_scheduler_type="constant", per_device_train_batch_size=math.ceil(config.batch_size / micro_batches),
                         gradient_accumulation_steps=micro_batches, max_length=config.max_length, max_grad_norm=0.0,
                         gradient_checkpointing=False, logging_steps=config.log_every, save_strategy="no",
                         report_to="none", use_cpu=True, bf16=False, seed=config.seed, weight_decay=0.0,
                         disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.add_callback(ProgressLines(config.steps))
        optimizer = None
        if config.method != "nonprivate":
            cls, extra = ((prism.PRISM, dict(preconditioner="two_sided", metric=config.metric))
                          if config.method == "prism"
                          else (prism.NaiveDPLoRA, {}))
            # built for len(trainer.train_dataset): SFTTrainer drops examples truncation leaves without a review token
            optimizer = trainer.optimizer = cls(
                model, lr=config.learning_rate, max_grad_norm=config.max_grad_norm, target_epsilon=config.epsilon,
                delta=config.delta, expected_batch_size=config.batch_size, dataset_size=len(trainer.train_dataset),
                steps=config.steps, generator=noise_generator, **extra)
            prism.hf.make_private(trainer, sampling_seed=sampling_seed)
        start = time.time()
        trainer.train()
        seconds = time.time() - start
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    info = dict(method=config.method, train_size=len(dataset), train_seconds=round(seconds, 1),
                final_train_loss=losses[-1] if losses else None, config=asdict(config), lr=config.learning_rate,
                template=asdict(template))
    if optimizer is not None:
        lower, estimate, upper = optimizer.get_epsilon()
        info.update(epsilon=upper, epsilon_estimate=estimate, epsilon_lower=lower, delta=config.delta,
                    noise_multiplier=optimizer.noise_multiplier, steps_taken=optimizer.steps_taken,
                    metric=optimizer.defaults.get("metric"))
    else:
        info.update(epsilon=None, delta=None)
    model.eval()
    return tokenizer, model, info


def for_sampling(model):
    """The model with its LoRA adapter merged into the base weights: the same function, fewer operations."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


class ProgressLines(TrainerCallback):
    """Prints the step, the training loss and the time left at each logging step (tqdm is off: logs stay readable)."""

    def __init__(self, steps: int):
        self.steps, self.start = steps, time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.global_step:
            left = (time.time() - self.start) / state.global_step * (self.steps - state.global_step)
            print(f"  generator step {state.global_step}/{self.steps} loss {logs['loss']:.4f} "
                  f"(~{left / 60:.1f} min left)", flush=True)


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """One JSON object per line, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def private_data(args) -> tuple[Template, list[str], list[int] | None]:
    """The template and the private examples the command line names (`--data`, or the study's data)."""
    if args.data is None:
        if args.labels or args.field or args.body:
            raise ValueError("--labels, --field and --body describe --data; the default data (Rotten Tomatoes) has its "
                             "own template")
        texts, labels = training_split()
        template = SENTIMENT
    else:
        template = Template(labels=tuple(args.labels) if args.labels else None, field=args.field or "Label",
                            body=args.body or "Text")
        texts, labels = load_corpus(args.data, template)
    if args.quick:
        texts, labels = texts[:64], None if labels is None else labels[:64]
    return template, texts, labels


def run(args, template: Template, texts: list[str], labels: list[int] | None) -> dict:
    torch.set_num_threads(args.threads)
    config = GeneratorConfig(method=args.method, epsilon=None if args.method == "nonprivate" else args.epsilon,
                             delta=args.delta, steps=args.steps, batch_size=args.batch_size,
                             micro_batch=args.micro_batch, lr=args.lr, max_grad_norm=args.max_grad_norm,
                             rank=args.rank, seed=args.seed, init=args.init, metric=args.metric, model=args.model,
                             max_length=args.max_length, log_every=1 if args.quick else 5)
    print(f"generator: {config.method} from the {config.lora_init} init, {len(texts)} private training texts, "
          f"{config.steps} steps of expected batch {config.batch_size}, lr {config.learning_rate:g}, target epsilon "
          f"{config.epsilon} at delta {config.delta:g}", flush=True)
    tokenizer, model, info = train_generator(texts, labels, config, template=template, quick=args.quick)
    sampling = SamplingConfig.quick() if args.quick else SamplingConfig(
        max_new_tokens=args.max_new_tokens, max_words=args.max_words)
    sampling = replace(sampling, scaffolding=template.scaffolding)
    judge = None
    if args.label_filter:  # a fresh copy of the released base model: it never saw the private data
        judge_tokenizer, judge_model = load_base(args.quick, args.model)
        judge = PublicLabelJudge(judge_model, judge_tokenizer, template)
    rows, report = sample_balanced(for_sampling(model), tokenizer, template.prompt, args.samples, sampling,
                                   seed=args.seed, judge=judge, labels=template.labels)
    if template.labels is not None:
        rows = [dict(text=r["text"], label=template.labels[r["label"]]) for r in rows]
    write_jsonl(args.out, rows)
    result = dict(generator=info, sampling=report)
    card = card_path(args.out)
    card.write_text(json.dumps(dict(result, samples=len(rows), released=Path(args.out).name), indent=1) + "\n")
    spent = "none (non-private generator)" if info["epsilon"] is None else \
        f"epsilon {info['epsilon']:.3f} (upper bound) at delta {config.delta:g}"
    print(f"wrote {len(rows)} synthetic texts to {args.out} (how they were made: {card}); privacy: {spent}; the "
          "samples and anything computed from them cost no further privacy", flush=True)
    return result


def card_path(out: str | os.PathLike) -> Path:
    """Where the record of a synthetic set is written: synthetic.jsonl -> synthetic.card.json."""
    return Path(out).with_suffix(".card.json")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = p.add_argument_group("private data (default: the study's Rotten Tomatoes sentences)")
    data.add_argument("--data", help='a JSON Lines file, one {"text": ..., "label": ...} per line')
    data.add_argument("--labels", nargs="+", help="the label names, in order (public: they are released with the "
                                                  "samples); none: unconditional generation")
    data.add_argument("--field", help='the word that introduces the label in the prompt (default "Label")')
    data.add_argument("--body", help='the word that introduces the text in the prompt (default "Text")')
    p.add_argument("--model", help="the base causal LM, a local folder or hub name (default SmolLM2-135M-Instruct); "
                                    "LoRA goes on its q/k/v/o projections")
    p.add_argument("--method", choices=METHODS, default="prism")
    p.add_argument("--epsilon", type=float, default=8.0, help="target epsilon (default: 8)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=GeneratorConfig.steps)
    p.add_argument("--batch-size", type=int, default=GeneratorConfig.batch_size, help="expected logical batch b = q N")
    p.add_argument("--micro-batch", type=int, default=GeneratorConfig.micro_batch)
    p.add_argument("--lr", type=float, default=None, help="default: prism and naive 1e-2, nonprivate 1e-3")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-length", type=int, default=GeneratorConfig.max_length,
                   help="tokens per training example, prompt included; longer ones are truncated "
                        "(default: %(default)s)")
    p.add_argument("--init", choices=INITS, default=None,
                   help="the adapter's start (default: pissa for prism, which needs full-rank factors; peft's "
                        "default, lora_B = 0, for the others)")
    p.add_argument("--metric", choices=METRICS, default="frobenius",
                   help="PRISM's clipping and noise metric (docs/method.md 3.7)")
    p.add_argument("--samples", type=int, default=2000, help="synthetic texts, the same number per label (default: "
                                                             "2000)")
    p.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens,
                   help="a sample must end within this many tokens (default: %(default)s)")
    p.add_argument("--max-words", type=int, default=SamplingConfig.max_words,
                   help="longer samples are dropped (default: %(default)s)")
    p.add_argument("--out", required=True, help="the JSONL file to write (and <out>.card.json beside it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA init and of sampling (noise and Poisson "
                                                       "draws always use OS entropy)")
    p.add_argument("--label-filter", action="store_true",
                   help="drop samples that the untuned public model, as a zero-shot classifier, reads as another "
                        "label (no privacy cost: it never sees the private data)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="a tiny random model, 2 steps, 8 samples: a smoke test")
    return p


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*PiSSA.*")
    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        if args.model:
            p.error("--quick trains a tiny random model; drop --model")
        args.steps, args.batch_size, args.micro_batch, args.samples = 2, 16, 16, min(args.samples, 8)
    if args.samples < 1:
        p.error(f"--samples must be > 0, got {args.samples}")
    if args.method != "nonprivate" and not args.epsilon > 0:
        p.error(f"--epsilon must be > 0, got {args.epsilon}")
    if args.label_filter and args.data is not None and not args.labels:
        p.error("--label-filter checks labels: it needs --labels")
    try:
        template, texts, labels = private_data(args)
    except (ValueError, OSError) as exc:  # the data or its template: the message names the fix
        p.error(str(exc))
    if args.samples % template.classes:
        p.error(f"--samples must be a multiple of the {template.classes} labels (balanced), got {args.samples}")
    return run(args, template, texts, labels)


if __name__ == "__main__":
    main()
