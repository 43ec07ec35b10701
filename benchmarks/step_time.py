"""Step time of PRISM and NaiveDPLoRA against non-private LoRA (AdamW) on one model, side by side.

    python benchmarks/step_time.py [--hidden 256 --layers 4 --batch 32 --seq 128 --rank 8 --steps 10]

Random-init BERT classifier, LoRA on query/value, the head trained. The methods run round-robin
(one step each per round) so that machine noise hits them alike; reports the median of `steps`
timed rounds after 2 warm-up rounds and the ratio to non-private. Writes
benchmarks/results/step_time.json.
"""

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F
from transformers import BertConfig, BertForSequenceClassification

import prism

warnings.filterwarnings("ignore")


def build(args, init):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                        max_position_embeddings=args.seq, num_labels=2)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"], task_type="SEQ_CLS",
                      init_lora_weights=init)
    return get_peft_model(BertForSequenceClassification(config), lora)


def make_runners(args):
    privacy = dict(lr=1e-3, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=args.batch,
                   loss_reduction="sum")
    runners = {}
    model = build(args, True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    runners["nonprivate"] = (model, opt)
    model = build(args, "pissa")
    runners["prism"] = (model, prism.PRISM(model, **privacy))
    model = build(args, True)
    runners["naive"] = (model, prism.NaiveDPLoRA(model, **privacy))
    return runners


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("hidden", 256), ("layers", 4), ("batch", 32), ("seq", 128), ("rank", 8), ("steps", 10)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    runners = make_runners(args)
    ids = torch.randint(0, 1000, (args.batch, args.seq))
    labels = torch.randint(0, 2, (args.batch,))
    times = {name: [] for name in runners}
    for round_ in range(args.steps + 2):
        for name, (model, opt) in runners.items():
            start = time.perf_counter()
            F.cross_entropy(model(input_ids=ids).logits, labels, reduction="sum").backward()
            opt.step()
            opt.zero_grad()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{'method':12s} {'median step (s)':>16s} {'x non-private':>14s}")
    for name, value in median.items():
        print(f"{name:12s} {value:16.3f} {value / median['nonprivate']:14.2f}")
    result = dict(config=vars(args), median_seconds=median,
                  ratio_to_nonprivate={k: v / median["nonprivate"] for k, v in median.items()},
                  machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, CPU threads "
                          f"{torch.get_num_threads()}")
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "step_time.json"), "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
