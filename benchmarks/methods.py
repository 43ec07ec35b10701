"""The methods, trained on identical splits, steps, expected batch size and LoRA targets.

- prism: prism.PRISM(preconditioner="one_sided"), the paper's r x r moments (PiSSA init: PRISM needs
  full-rank factors);
- prism_two_sided: the same with preconditioner="two_sided" (per-row second moments, docs/method.md 3.5;
  the library's default);
- naive: prism.NaiveDPLoRA, DP-AdamW on both factors (peft's default init, lora_B = 0);
- opacus: Opacus' DP-SGD machinery (PrivacyEngine.make_private, Poisson sampling, its own PRV
  accountant calibrated to the same epsilon and delta) around torch's AdamW, on the same peft model;
- ffa: FFA-LoRA, lora_A frozen at its random init, lora_B trained by NaiveDPLoRA;
- nonprivate: AdamW, no clipping and no noise;
- head: a DP linear probe, the classification head alone trained by Opacus' DP-AdamW, LoRA frozen at
  peft's init (Z = 0, so the pretrained encoder unchanged): what the private methods reach without LoRA.
Every method trains the classification head too (privately for the private ones), takes one
step per Poisson-sampled logical batch of expected size b, and sums per-example losses
(the non-private one averages them over the realised batch).

Benchmark runs seed the sampling and noise generators (seed, seed + 1) so that a run can be
repeated; a real deployment must not (see docs/guarantees.md).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

import prism
from prism.examples.sentiment import accuracy

from .tasks import Split, minilm

METHODS = ("prism", "prism_two_sided", "naive", "opacus", "ffa", "nonprivate", "head")
OPACUS_METHODS = ("opacus", "head")  # trained by Opacus (needs the bench extra)


@dataclass(frozen=True)
class Setup:
    """What every method shares."""

    steps: int = 60
    batch_size: int = 256  # expected logical batch b = q N
    micro_batch: int = 128  # physical batch of the prism-family loops (Opacus takes the logical batch whole)
    max_length: int = 40  # tokens per sentence, padded per micro-batch
    max_grad_norm: float = 1.0
    dense_max_grad_norm: float | None = None  # the head's scale in prism's joint clip (None: max_grad_norm)
    floor_mode: str = "scalar"  # PRISM's DP-aware second-moment floor (method 3.5); the other methods have none
    floor_factor: float = 0.5
    delta: float = 1e-5
    rank: int = 8
    log_every: int = 20


QUICK = Setup(steps=3, batch_size=16, micro_batch=16, max_length=32, log_every=0)


def opacus_available() -> bool:
    return importlib.util.find_spec("opacus") is not None


def train(method: str, split: Split, setup: Setup, *, epsilon: float | None, seed: int, lr: float,
          full_rank: bool | None = None, gauge: float = 1.0, after_step=None) -> dict:
    """Train one method from the pretrained model and return its accuracies and privacy spent.

    Args:
        epsilon: target epsilon at setup.delta (None: non-private).
        full_rank: PiSSA init (default: only for the PRISM methods).
        gauge: re-factor every initial adapter (A, B) as (gauge A, B / gauge) first (same Z).
        after_step: called with the optimizer after each step (the prism-family methods only).
    """
    if (epsilon is None) != (method == "nonprivate"):
        raise ValueError(f"{method}: epsilon={epsilon}")
    if after_step is not None and method in OPACUS_METHODS:
        raise ValueError(f"{method}: after_step is for the methods trained by prism's optimizers")
    torch.manual_seed(seed)
    tokenizer, model = minilm(method.startswith("prism") if full_rank is None else full_rank, setup.rank)
    refactor(model, gauge)
    model.train()  # from_pretrained returns eval mode; Opacus only records activations in training mode
    freeze(model, *{"ffa": (".lora_A.",), "head": (".lora_A.", ".lora_B.")}.get(method, ()))
    start = time.time()
    if method in OPACUS_METHODS:
        model, info = _train_opacus(method, model, tokenizer, split, setup, epsilon, seed, lr)
    else:
        model, info = _train_prism_family(method, model, tokenizer, split, setup, epsilon, seed, lr, after_step)
    return dict(method=method, target_epsilon=epsilon, seed=seed, lr=lr, gauge=gauge,
                val_accuracy=accuracy(model, tokenizer, split.val_x, split.val_y, setup.max_length),
                test_accuracy=accuracy(model, tokenizer, split.test_x, split.test_y, setup.max_length),
                train_seconds=round(time.time() - start, 1), setup=asdict(setup), train_size=len(split.train_x),
                **info)


def freeze(model, *parts: str) -> None:
    """requires_grad = False on every parameter whose name contains one of `parts` (FFA-LoRA: ".lora_A.")."""
    for name, param in model.named_parameters():
        if any(part in name for part in parts):
            param.requires_grad_(False)


@torch.no_grad()
def refactor(model, c: float) -> None:
    """(A, B) -> (c A, B / c) for every LoRA module: lora_B.weight * c, lora_A.weight / c (Z unchanged)."""
    if c == 1.0:
        return
    for pair in prism.find_trainables(model)[0]:
        pair.lora_B.weight.mul_(c)
        pair.lora_A.weight.div_(c)


@functools.lru_cache(maxsize=None)
def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """prism's calibration (what target_epsilon= does), cached: it takes ~15 s per call."""
    return prism.calibrate_noise_multiplier(epsilon, delta, sample_rate, steps=steps)


@functools.lru_cache(maxsize=None)
def _opacus_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus' own calibration with its PRV accountant, cached."""
    from opacus.accountants.utils import get_noise_multiplier

    return get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                accountant="prv")


def _generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """(sampling, noise) generators of a benchmark run."""
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)


class _Log:
    """Running training loss, printed every setup.log_every steps with the time left of the run."""

    def __init__(self, setup: Setup):
        self.setup, self.losses, self.start, self.step = setup, [], time.time(), 0

    def __call__(self, loss_sum: float, examples: int) -> None:
        self.step += 1
        self.losses.append(loss_sum / max(examples, 1))
        every = self.setup.log_every
        if every and self.step % every == 0:
            elapsed = time.time() - self.start
            print(f"    step {self.step}/{self.setup.steps} loss {sum(self.losses[-every:]) / every:.4f} "
                  f"(~{elapsed / self.step * (self.setup.steps - self.step):.0f}s left)", flush=True)

    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail)


def _train_prism_family(method, model, tokenizer, split, setup, epsilon, seed, lr, after_step=None):
    n = len(split.train_x)
    sample_gen, noise_gen = _generators(seed)
    if method == "nonprivate":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    else:
        cls, floor = prism.NaiveDPLoRA, {}
        if method.startswith("prism"):
            cls, floor = prism.PRISM, dict(floor_mode=setup.floor_mode, floor_factor=setup.floor_factor)
            floor["preconditioner"] = "two_sided" if method == "prism_two_sided" else "one_sided"
        sigma = noise_multiplier(epsilon, setup.delta, setup.batch_size / n, setup.steps)
        opt = cls(model, lr=lr, max_grad_norm=setup.max_grad_norm, dense_max_grad_norm=setup.dense_max_grad_norm,
                  noise_multiplier=sigma, delta=setup.delta, expected_batch_size=setup.batch_size, dataset_size=n,
                  loss_reduction="sum", generator=noise_gen, **floor)
    labels = torch.tensor(split.train_y)
    log, clipped, seen = _Log(setup), 0, 0
    for batch in prism.PoissonBatchSampler(n, setup.batch_size / n, setup.steps, generator=sample_gen):
        loss_sum = 0.0
        for start in range(0, len(batch), setup.micro_batch):
            index = batch[start:start + setup.micro_batch]
            enc = tokenizer([split.train_x[i] for i in index], padding=True, truncation=True,
                            max_length=setup.max_length, return_tensors="pt")
            loss = F.cross_entropy(model(**enc).logits, labels[index], reduction="sum")
            (loss / len(batch) if method == "nonprivate" else loss).backward()
            loss_sum += loss.item()
        if method != "nonprivate":
            clipped, seen = clipped + opt.stats.clipped, seen + opt.stats.examples
        opt.step()
        if after_step is not None:
            after_step(opt)
        opt.zero_grad()
        log(loss_sum, len(batch))
    info = dict(final_train_loss=log.final_loss())
    if method != "nonprivate":
        info.update(epsilon=opt.get_epsilon()[2], noise_multiplier=opt.noise_multiplier,
                    clipped_fraction=clipped / max(seen, 1))
    return model, info


def _train_opacus(method, model, tokenizer, split, setup, epsilon, seed, lr):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    if setup.dense_max_grad_norm is not None:
        raise ValueError(f"{method}: Opacus has no weighted joint clip (dense_max_grad_norm); run it without.")
    n = len(split.train_x)
    sample_gen, noise_gen = _generators(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=setup.batch_size, generator=sample_gen)
    engine = PrivacyEngine(accountant="prv")
    sigma = _opacus_noise_multiplier(epsilon, setup.delta, 1 / len(loader), setup.steps)
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                             noise_multiplier=sigma, max_grad_norm=setup.max_grad_norm,
                                             poisson_sampling=True, loss_reduction="mean", noise_generator=noise_gen)
    labels = torch.tensor(split.train_y)
    log = _Log(setup)
    for _ in range(math.ceil(setup.steps / len(loader))):
        for (index,) in loader:
            if log.step == setup.steps:
                break
            index = index.tolist()
            enc = tokenizer([split.train_x[i] for i in index], padding=True, truncation=True,
                            max_length=setup.max_length, return_tensors="pt")
            loss = F.cross_entropy(model(**enc).logits, labels[index])  # Opacus rescales by the expected b
            loss.backward()
            opt.step()
            opt.zero_grad()
            log(loss.item() * len(index), len(index))
    return model, dict(final_train_loss=log.final_loss(), epsilon=engine.get_epsilon(setup.delta),
                       noise_multiplier=sigma)
