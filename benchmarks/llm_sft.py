"""Privacy-utility of a private chat fine-tune: held-out completion perplexity of SmolLM2 (issue 22, task b).

    python -m benchmarks.llm_sft --stage tune     # lr grid at epsilon 3, seed 0, scored on validation (resumable)
    python -m benchmarks.llm_sft --stage test     # tuned rates, epsilon 3 and 8, seeds 0-2, validation and test
    python -m benchmarks.llm_sft --summary-only   # the table from the result files
    python -m benchmarks.llm_sft --quick          # CI: a few steps on a few examples, no claims

Task: the LLM main job's (prism.examples.chat): movie-dialogue statement -> reply pairs as conversations,
the loss on the reply only, SmolLM2-135M-Instruct with LoRA r = 8 on q/k/v/o, a vanilla TRL SFTTrainer made
private by prism.hf.make_private. Held out from training (chat.load_dialog's seeded split, data seed 0):
VALIDATION pairs for tuning, the next TEST pairs for the reported numbers. Metric: the mean negative
log-likelihood per reply token and its exponential, the perplexity (lower is better).
Methods (VARIANTS): zeroshot (no training), nonprivate (AdamW), prism (PRISM from PiSSA, two-sided moments, the
Frobenius metric: the optimizer's defaults), prism_balanced_fm (PRISM from prism.init_balanced_lora with
metric="balanced": the configuration docs/usage.md recommends for next-token fine-tuning), naive (NaiveDPLoRA from
peft's default init, as its users run it), ffa (FFA-LoRA: PiSSA's lora_A frozen, lora_B trained by NaiveDPLoRA),
and diagnostics run when named: prism_balanced_adam and prism_balanced_factor_step (prism_balanced_fm's step made
like naive DP-Adam's one part at a time, benchmarks.llm_ablations), prism_one_sided (the paper's r x r moments),
prism_balanced (PRISM from prism.init_balanced_lora: random orthonormal subspaces, base compensated; Z's singular
values 1/3),
prism_balanced_10 (the same with singular values 10: does a Z large against PRISM's steps, whose tangent space
turns slowly, do better?), prism_balanced_small (singular values 0.01: PRISM's steps in Z scale with sqrt(sigma),
so they start small and grow with Z, as naive DP-LoRA's do from lora_B = 0), naive_balanced (NaiveDPLoRA from
prism_balanced's start: is the zero start what naive has?), ffa_random (FFA-LoRA from peft's random lora_A, the
FFA-LoRA paper's setting), nonprivate_pissa (AdamW from PiSSA). Every run: the same data, steps, expected batch and
C; the run's seed seeds the noise and the Poisson draws. Learning rates: the grid below,
chosen by validation loss at epsilon 3, seed 0, for every method alike, and extended past an edge that holds the
optimum (benchmarks.utility's rule, --edge-steps).
Results: results/llm_sft/<stage>/<method>_eps<e>_seed<s>_lr<lr>.json and results/llm_sft.json.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from . import common, methods, update_geometry, utility


class Variant(NamedTuple):
    """How a method of this benchmark is run."""

    optimizer: str  # the chat example's --method: zeroshot, nonprivate, prism or naive
    init: str = "default"  # peft's (lora_B = 0), "pissa" or "balanced" (prism.init_balanced_lora)
    frozen_A: bool = False  # FFA-LoRA: lora_A frozen at its init, lora_B trained
    preconditioner: str = "two_sided"  # PRISM's second moments
    diagnostic: bool = False  # not in the default sweep: run when named
    balanced_scale: float = 3 ** -0.5  # init "balanced": the factors' scale c (Z's singular values c^2)
    metric: str = "frobenius"  # PRISM's clipping and noise metric
    ablation: str | None = None  # a PRISM subclass of benchmarks.llm_ablations


VARIANTS = {
    "zeroshot": Variant("zeroshot"),
    "nonprivate": Variant("nonprivate"),
    "prism": Variant("prism", "pissa"),
    "prism_one_sided": Variant("prism", "pissa", preconditioner="one_sided", diagnostic=True),
    "prism_balanced": Variant("prism", "balanced", diagnostic=True),
    "prism_balanced_10": Variant("prism", "balanced", diagnostic=True, balanced_scale=10 ** 0.5),
    "prism_balanced_small": Variant("prism", "balanced", diagnostic=True, balanced_scale=0.1),
    # from the balanced start, PRISM's step made like naive's one part at a time (metric, moments, factor step)
    "prism_balanced_fm": Variant("prism", "balanced", metric="balanced"),
    "prism_balanced_adam": Variant("prism", "balanced", diagnostic=True, metric="balanced",
                                   ablation="PRISMElementwiseAdam"),
    "prism_balanced_factor_step": Variant("prism", "balanced", diagnostic=True, metric="balanced",
                                          ablation="PRISMFactorStep"),
    "naive": Variant("naive"),
    "naive_balanced": Variant("naive", "balanced", diagnostic=True),  # does naive need its zero start?
    "ffa": Variant("naive", "pissa", frozen_A=True),
    "ffa_random": Variant("naive", frozen_A=True, diagnostic=True),  # the FFA-LoRA paper's random lora_A
    "nonprivate_pissa": Variant("nonprivate", "pissa", diagnostic=True),  # does PiSSA cost without DP too?
}
METHODS = tuple(VARIANTS)
GRID = {"nonprivate": (3e-4, 1e-3, 3e-3)}  # by optimizer
DEFAULT_GRID = (1e-3, 3e-3, 1e-2)
TUNE_EPSILON, EPSILONS, SEEDS = 3.0, (3.0, 8.0), (0, 1, 2)


@dataclass(frozen=True)
class Setup:
    steps: int = 30
    batch_size: int = 64
    micro_batch: int = 32
    train_size: int = 20000
    validation: int = 300
    test: int = 300
    max_chars: int = 80
    max_length: int = 96
    rank: int = 8
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    score_test: bool = True


QUICK = Setup(steps=2, batch_size=8, micro_batch=8, train_size=64, validation=8, test=8)


def train(method: str, setup: Setup, *, epsilon: float | None, seed: int, lr: float | None) -> dict:
    """One run: fine-tune (unless zero-shot), then the completion loss on validation (and test)."""
    from prism.examples import chat

    torch.manual_seed(seed)
    train_pairs, heldout = chat.load_dialog(setup.max_chars, setup.validation + setup.test, seed=0)
    validation, test = heldout[:setup.validation], heldout[setup.validation:]
    variant = VARIANTS[method]
    # balanced: drawn from the run's seed (public randomness)
    tokenizer, model = chat.build_model(setup.rank, variant.init, variant.balanced_scale)
    if variant.frozen_A:
        methods.freeze(model, ".lora_A.")
    result = dict(method=method, target_epsilon=epsilon, seed=seed, lr=lr, setup=asdict(setup))
    if method != "zeroshot":
        before = update_geometry.snapshot(model)
        args = chat.parser().parse_args([])
        for key, value in dict(method=variant.optimizer, epsilon=epsilon, delta=setup.delta, steps=setup.steps, lr=lr,
                               batch_size=setup.batch_size, micro_batch=setup.micro_batch, rank=setup.rank,
                               max_grad_norm=setup.max_grad_norm, max_length=setup.max_length, seed=seed,
                               log_every=max(1, setup.steps // 6), noise_seed=seed,
                               preconditioner=variant.preconditioner, metric=variant.metric).items():
            setattr(args, key, value)
        start = time.time()
        with tempfile.TemporaryDirectory() as output_dir:
            trainer, optimizer = chat.build_trainer(args, model, tokenizer, train_pairs[:setup.train_size], output_dir,
                                                    **_optimizer_override(variant))
            trainer.train()
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        result.update(train_seconds=round(time.time() - start, 1), train_losses=losses,
                      update_geometry=update_geometry.update_geometry(model, before),
                      start_overlap=update_geometry.start_overlap(before))
        if optimizer is not None:
            result.update(epsilon=optimizer.get_epsilon()[2], noise_multiplier=optimizer.noise_multiplier)
    for split, pairs in [("val", validation)] + ([("test", test)] if setup.score_test else []):
        sums, counts = chat.completion_nll(model, tokenizer, pairs)  # per reply: paired errors between runs
        loss = sum(sums) / sum(counts)
        result.update({f"{split}_loss": loss, f"{split}_perplexity": math.exp(loss), f"{split}_reply_nll": sums,
                       f"{split}_reply_tokens": counts})
    return result


def _optimizer_override(variant: Variant) -> dict:
    """chat.build_trainer's optimizer_class for an ablation ({} for the others)."""
    if not variant.ablation:
        return {}
    from . import llm_ablations
    return dict(optimizer_class=getattr(llm_ablations, variant.ablation))


def run_path(folder: Path, stage: str, method: str, epsilon, seed: int, lr) -> Path:
    eps = "inf" if epsilon is None else f"{epsilon:g}"
    return folder / "llm_sft" / stage / f"{method}_eps{eps}_seed{seed}_lr{'none' if lr is None else f'{lr:g}'}.json"


def private(method: str) -> bool:
    return VARIANTS[method].optimizer not in ("zeroshot", "nonprivate")


def grid(method: str, args) -> list:
    if method == "zeroshot":
        return [None]
    return list(args.lr_grid or GRID.get(VARIANTS[method].optimizer, DEFAULT_GRID))


def _tune_score(folder: Path, method: str):
    """minus the validation loss of the method's tuning run at a rate (None while it is missing)."""
    eps = TUNE_EPSILON if private(method) else None
    return lambda lr: utility.read_score(run_path(folder, "tune", method, eps, 0, lr), "val_loss", -1.0)


def tuning_grid(folder: Path, method: str, args) -> list:
    """The method's grid, extended past the edge where its lowest validation loss lies (utility's rule)."""
    return utility.extended_grid(grid(method, args), _tune_score(folder, method), args.edge_steps)


def tuned_lr(folder: Path, method: str, args):
    """The rate of the grid with the lowest validation loss at the tuning epsilon, seed 0 (None: not all run)."""
    return utility.best_rate(tuning_grid(folder, method, args), _tune_score(folder, method))


def job(method, setup, epsilon, seed, lr):
    return lambda: train(method, setup, epsilon=epsilon, seed=seed, lr=lr)


def sweep(args, folder: Path, setup: Setup) -> None:
    if args.stage == "tune":
        tune = replace(setup, score_test=False)
        while True:  # rate-major from the grid's middle (every method at one rate first), then the extensions
            order = utility.rate_major({m: tuning_grid(folder, m, args) for m in args.methods})
            jobs = [(run_path(folder, "tune", m, TUNE_EPSILON if private(m) else None, 0, lr),
                     job(m, tune, TUNE_EPSILON if private(m) else None, 0, lr)) for m, lr in order]
            if all(p.exists() for p, _ in jobs):
                return
            common.run_queue(jobs, "sft learning-rate tuning")
    jobs = []
    for seed in args.seeds:
        for epsilon in args.epsilons:
            for m in args.methods:
                lr = tuned_lr(folder, m, args)
                if lr is None and m != "zeroshot":
                    print(f"{m}: not tuned yet, skipped")
                    continue
                if not private(m) and (epsilon != args.epsilons[0] or (m == "zeroshot" and seed != args.seeds[0])):
                    continue
                eps = epsilon if private(m) else None
                jobs.append((run_path(folder, "test", m, eps, seed, lr), job(m, setup, eps, seed, lr)))
    common.run_queue(jobs, "sft test runs")


def table(folder: Path, args) -> str:
    """Markdown: the test stage's mean +- std of the test perplexity per (method, epsilon), then the tuning grid:
    validation perplexity per method and rate (the rates of every method's tuning grid, run or not), the tuned
    rate in bold (tuned "*": a run of the method's grid is missing)."""
    rows = {}
    for path in sorted((folder / "llm_sft" / "test").glob("*.json")):
        r = common.read_json(path)
        rows.setdefault((r["method"], r["target_epsilon"]), []).append(r["test_perplexity"])
    lines = ["| method | epsilon | test perplexity (mean +- std) | seeds |", "|---|---|---|---|"]
    for (method, eps), values in sorted(rows.items(), key=lambda x: (x[0][1] or 1e9, x[0][0])):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {method} | {eps if eps is not None else '-'} | {statistics.mean(values):.2f} +- {std:.2f} | "
                     f"{len(values)} |")
    tuning_files = sorted((folder / "llm_sft" / "tune").glob("*.json"))
    runs = {(r["method"], r["lr"]): r for r in map(common.read_json, tuning_files)}
    present = [m for m in METHODS if any(name == m for name, _ in runs)]
    rates = sorted({lr for _, lr in runs if lr is not None}
                   | {lr for m in present if m != "zeroshot" for lr in tuning_grid(folder, m, args)})
    lines += ["", "| tuning: validation perplexity | " + " | ".join(f"{lr:g}" for lr in rates) + " | tuned |",
              "|---" * (len(rates) + 2) + "|"]
    for method in present:
        if method == "zeroshot":
            cells = [f"{runs[(method, None)]['val_perplexity']:.2f} (no training)"] + [""] * (len(rates) - 1)
            lines.append("| zeroshot | " + " | ".join(cells) + " | - |")
            continue
        best = tuned_lr(folder, method, args)
        cells = [f"{runs[(method, lr)]['val_perplexity']:.2f}" if (method, lr) in runs else "" for lr in rates]
        cells = [f"**{cell}**" if lr == best else cell for lr, cell in zip(rates, cells)]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'*' if best is None else f'{best:g}'} |")
    return "\n".join(lines)


def paired_loss_difference(a: dict, b: dict, split: str) -> tuple[float, float]:
    """Run a's mean loss per reply token minus run b's on a split both scored, and its standard error over replies.

    With per-reply sums d_i = nll_a_i - nll_b_i over t_i tokens, the difference is the ratio D = sum d_i / sum t_i;
    its delta-method standard error is sqrt(n / (n - 1) * sum (d_i - D t_i)^2) / sum t_i. It measures how well the
    shared held-out replies resolve the two trained models, not the spread over training seeds."""
    tokens = a[f"{split}_reply_tokens"]
    if b[f"{split}_reply_tokens"] != tokens:
        raise ValueError(f"{a['method']} and {b['method']} were scored on different {split} replies")
    d = [x - y for x, y in zip(a[f"{split}_reply_nll"], b[f"{split}_reply_nll"])]
    total, n = sum(tokens), len(d)
    diff = sum(d) / total
    return diff, math.sqrt(n / (n - 1) * sum((di - diff * t) ** 2 for di, t in zip(d, tokens))) / total


REFERENCE = "naive"  # the paired table's baseline: the best DP method of the tuning grid


def paired_table(folder: Path) -> str:
    """Markdown: every run minus naive DP-LoRA's of the same epsilon and seed (non-private runs beside each) in mean
    loss per reply token, with the standard error over the shared replies; only runs that stored per-reply losses.
    Validation: each method at its best rate run so far, tuning and test stage alike (a test-stage run of seed 0 at
    the tuning epsilon repeats the tuning run of its rate: same batches, noise and validation replies); no row when
    that run predates per-reply losses. Test: the test stage. Positive: behind naive."""
    runs = [common.read_json(path) for stage in ("tune", "test")
            for path in sorted((folder / "llm_sft" / stage).glob("*.json"))]
    lines = [f"| split | epsilon | seed | method | lr | minus {REFERENCE}: loss difference +- s.e. | z |",
             "|---" * 7 + "|"]
    for split in ("val", "test"):
        ranked: dict[tuple, tuple] = {}  # (epsilon, seed, method) -> (rank, its run with the lowest loss on the split)
        for r in runs:
            key = (r["target_epsilon"], r["seed"], r["method"])
            rank = (round(r.get(f"{split}_loss", math.inf), 6), f"{split}_reply_nll" not in r)
            if key not in ranked or rank < ranked[key][0]:
                ranked[key] = rank, r  # of equal losses (a run and its repeat), the one with per-reply losses
        best = {key: r for key, (_, r) in ranked.items() if f"{split}_reply_nll" in r}
        for (eps, seed, method), ref in sorted(best.items(), key=lambda x: (x[0][0] or 0, x[0][1], x[0][2])):
            if method != REFERENCE:
                continue
            others = [r for (e, s, m), r in best.items()
                      if s == seed and m != REFERENCE and (e == eps or not private(m))]
            for other in sorted(others, key=lambda r: r[f"{split}_loss"]):
                diff, se = paired_loss_difference(other, ref, split)
                lr = "-" if other["lr"] is None else f"{other['lr']:g}"
                z = f"{diff / se:+.1f}" if se > 0 else "-"
                lines.append(f"| {split} | {eps:g} | {seed} | {other['method']} | {lr} | {diff:+.4f} +- {se:.4f} "
                             f"| {z} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["tune", "test"], default="tune")
    diagnostics = [m for m, v in VARIANTS.items() if v.diagnostic]
    p.add_argument("--methods", nargs="+", choices=METHODS, default=[m for m in METHODS if m not in diagnostics],
                   help=f"default: all but the diagnostics {', '.join(diagnostics)}")
    p.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--lr-grid", nargs="+", type=float, default=None, help="one grid for every method")
    p.add_argument("--edge-steps", type=int, default=1, help="rates added past a grid edge holding the optimum")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    common.quiet()
    setup = QUICK if args.quick else Setup()
    if args.quick:
        args.lr_grid, args.epsilons, args.seeds, args.edge_steps = args.lr_grid or [1e-3], [8.0], [0], 0
    folder = common.out_dir(args)
    if not args.summary_only:
        sweep(args, folder, setup)
    text = table(folder, args) + "\n\n" + paired_table(folder)
    common.write_json(folder / "llm_sft.json", {f"{p.parent.name}/{p.stem}": common.read_json(p)
                                                 for p in sorted((folder / "llm_sft").glob("*/*.json"))})
    print(text)
    return text


if __name__ == "__main__":
    main()
