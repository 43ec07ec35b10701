"""Privacy-utility on a real LLM, with diagnostics: SmolLM2-135M-Instruct, sentiment as text (issue 22).

    python -m benchmarks.llm --stage tune            # lr grid on the validation split (resumable)
    python -m benchmarks.llm --stage test            # tuned rates, all epsilons and seeds
    python -m benchmarks.llm --stage probe --stop-after 8  # 8 of 40 steps per method: diagnostics
    python -m benchmarks.llm --stage gauge --methods prism_two_sided naive   # the same Z factored (c A, B / c)
    python -m benchmarks.llm --stage test --task sms_spam --epsilons 3 --seeds 0   # the check task, same rates
    python -m benchmarks.llm --summary-only          # the tables from the result files
    python -m benchmarks.llm --quick                 # CI: a tiny random Llama, a few steps, no claims

Task (benchmarks.llm_tasks): Rotten Tomatoes as "Review: ... Sentiment:" -> " positive" | " negative",
the loss on the answer token only (one token each), scored by comparing the two answers' likelihoods;
SMS spam ("Message: ... Spam or ham:" -> " ham" | " spam") as a check, at the rates tuned on Rotten
Tomatoes (results under results/llm/sms_spam-test/).
Model: SmolLM2-135M-Instruct (prism.pretrained.smollm2), LoRA r = 8, alpha = 8 on q_proj and v_proj of
all 30 layers (60 modules, 460,800 parameters), no dropout, no new head (the LM head stays frozen).
Every method trains with a plain loop: prism.poisson_data_loader draws each logical batch (expected
size b), sorted by length and cut into micro-batches, one optimizer step per batch; per-example
SUM loss for the private methods, the batch mean for the non-private one.

Methods (all from peft's PiSSA adapter, "pissa_niter_4", unless named otherwise):
    zeroshot       no training
    nonprivate     AdamW, no clipping, no noise
    prism          prism.PRISM(preconditioner="one_sided"): the paper's r x r moments, floor f = 0.5 (default);
                   prism_f5: the same, f = 5; prism_geo, prism_bal, prism_factor_metric are one-sided too
    prism_sgd      prism.PRISM(adaptive=False): Riemannian DP-SGD
    prism_geo      prism.PRISM(floor_mode="geometry"): the floor at the lifted noise's own scale
    prism_bal      PRISM from prism.init_balanced_lora (c = 1/sqrt(3), base compensated), not PiSSA
    naive_bal      naive DP-LoRA from the same balanced init
    naive          prism.NaiveDPLoRA (DP-AdamW on both factors)
    naive_default  the same from peft's default init (lora_B = 0), the way its users run it
    ffa            FFA-LoRA: lora_A frozen (at PiSSA's), lora_B trained by NaiveDPLoRA
    prism_two_sided      PRISM(preconditioner="two_sided", the default): per-row moments (docs/method.md 3.5);
                         prism_two_sided_f5: the same with the floor f = 5 (default 0.5)
    prism_two_sided_bal  the same from the balanced init (random subspaces, like naive_default's lora_A)
    prism_shrink         prism_two_sided with momentum_shrinkage=True: each module's step times the share of its
                         first moment that is not noise (docs/method.md 3.5)
    prism_factor_metric  PRISM(metric="balanced"): clipped and noised in the factor norm (method.md 3.7)
    prism_fm_two_sided   the balanced metric with two-sided moments; prism_bal_two_sided: the same from
                         the balanced init
    prism_fm_adam        ablation: the balanced metric with Adam's per-coordinate moments (llm_ablations)

The gauge stage starts every method from its PiSSA adapter re-factored as (c A, B / c) (the same Z, so the
same model), c in --gauge-c, at the tuning epsilon, seed 0 and the method's tuned learning rate, scored
on the validation split (c = 1 is the tuning run itself).

Each run writes results/llm/<stage>/<method>[_c<c>]_eps<e>_seed<s>_lr<lr>.json (with --lr-schedule linear:
results/linear-decay/llm/..., a protocol of its own) with the provenance, settings,
val/test accuracy and, for every step: the training loss, the fraction of examples clipped and the
median per-example norm (optimizer.stats), ||dZ|| and ||dZ|| / ||Z|| per module, and the second
moments read from the optimizer state against noise_std^2 (PRISM: eigenvalues of the r x r moments;
naive: the per-coordinate moments).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import prism

from . import common, llm_tasks, methods, utility
from .llm_diagnostics import StepLog, init_summary, z_matrix

STAGES = ("tune", "test", "probe", "gauge")
GAUGE_C = (0.1, 1.0, 10.0)
METHODS = ("zeroshot", "nonprivate", "prism", "prism_f5", "prism_sgd", "prism_geo", "prism_bal", "naive",
           "naive_default", "naive_bal", "ffa", "prism_factor_metric", "prism_fm_adam", "prism_fm_two_sided",
           "prism_two_sided", "prism_two_sided_f5", "prism_bal_two_sided", "prism_two_sided_bal", "prism_shrink")
PRIVATE = tuple(m for m in METHODS if m not in ("zeroshot", "nonprivate"))
# the others: DEFAULT_GRID. Riemannian DP-SGD (prism_sgd) has no 1 / noise-std normalisation: at lr 1e-2 its
# step in Z is ~200x smaller than the adaptive methods' (results/llm/probe8of40), hence its own grid
# prism_shrink: the momentum shrinkage multiplies each module's step by its moment's signal share, about 0.01-0.06
# on SmolLM2 at epsilon 3 in the first steps (a 10-step probe at lr 1e-2), hence a grid about 10x higher (first
# (0.1, 0.3, 1.0): 0.3 already diverged for 10 steps, validation 54.4 %, so 1.0 was not run and the grid moved down)
LR_GRID = {"nonprivate": (3e-4, 1e-3, 3e-3), "prism_sgd": (0.3, 1.0, 3.0), "prism_shrink": (0.03, 0.1, 0.3)}
DEFAULT_GRID = (3e-3, 1e-2, 3e-2)
EPSILONS = (3.0, 8.0)
TUNE_EPSILON = 3.0  # the issue's rule: tune at epsilon 3, seed 0, validation; epsilon-8 tuning files are diagnostics
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Setup:
    steps: int = 40
    batch_size: int = 64  # expected logical batch b = q N
    micro_batch: int = 32
    max_length: int = 64  # prompt tokens (the review is truncated)
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    rank: int = 8
    val_size: int = 500  # the first examples of benchmarks.tasks' validation split
    test: bool = True  # score the test split (2000) too
    stop_after: int | None = None  # probes: noise calibrated for `steps`, training stopped after this many
    threads: int = 1
    task: str = "rotten_tomatoes"  # llm_tasks.PROMPTS; other tasks: test stage only, at the rates tuned on this one
    lr_schedule: str = "constant"  # or "linear": lr (1 - t / steps) at step t = 0, 1, ... (the HF Trainer's default)


QUICK = Setup(steps=3, batch_size=16, micro_batch=8, max_length=32, val_size=64)


ONE_SIDED = "one_sided"  # the paper's r x r moments: what these methods ran with (the default before two-sided)


def method_config(method: str) -> dict:
    """init and optimizer of a method."""
    return dict(
        zeroshot=dict(init="pissa"), nonprivate=dict(init="pissa"),
        prism=dict(init="pissa", cls="PRISM", kwargs=dict(floor_factor=0.5, preconditioner=ONE_SIDED)),
        prism_f5=dict(init="pissa", cls="PRISM", kwargs=dict(floor_factor=5.0, preconditioner=ONE_SIDED)),
        prism_sgd=dict(init="pissa", cls="PRISM", kwargs=dict(adaptive=False)),
        prism_geo=dict(init="pissa", cls="PRISM",
                       kwargs=dict(floor_mode="geometry", floor_factor=0.5, preconditioner=ONE_SIDED)),
        prism_bal=dict(init="balanced", cls="PRISM", kwargs=dict(floor_factor=0.5, preconditioner=ONE_SIDED)),
        prism_factor_metric=dict(init="pissa", cls="PRISM",
                                 kwargs=dict(metric="balanced", floor_factor=0.5, preconditioner=ONE_SIDED)),
        prism_fm_adam=dict(init="pissa", cls="PRISMElementwiseAdam", kwargs={}),  # ablation (llm_ablations)
        prism_fm_two_sided=dict(init="pissa", cls="PRISM", kwargs=dict(metric="balanced", preconditioner="two_sided")),
        prism_two_sided=dict(init="pissa", cls="PRISM", kwargs=dict(preconditioner="two_sided")),
        prism_two_sided_f5=dict(init="pissa", cls="PRISM", kwargs=dict(preconditioner="two_sided", floor_factor=5.0)),
        prism_shrink=dict(init="pissa", cls="PRISM", kwargs=dict(preconditioner="two_sided", momentum_shrinkage=True)),
        prism_two_sided_bal=dict(init="balanced", cls="PRISM", kwargs=dict(preconditioner="two_sided")),
        prism_bal_two_sided=dict(init="balanced", cls="PRISM", kwargs=dict(metric="balanced",
                                                                          preconditioner="two_sided")),
        naive_bal=dict(init="balanced", cls="NaiveDPLoRA", kwargs={}),
        naive=dict(init="pissa", cls="NaiveDPLoRA", kwargs={}),
        naive_default=dict(init="default", cls="NaiveDPLoRA", kwargs={}),
        ffa=dict(init="pissa", cls="NaiveDPLoRA", kwargs={}, freeze_A=True),
    )[method]


def _optimizer_class(name: str):
    if name == "PRISMElementwiseAdam":
        from .llm_ablations import PRISMElementwiseAdam
        return PRISMElementwiseAdam
    return getattr(prism, name)


# ---------------------------------------------------------------------------------------------- training

def train(method: str, setup: Setup, *, epsilon: float | None, seed: int, lr: float, quick: bool = False,
          data_cache: dict | None = None, gauge: float = 1.0) -> dict:
    torch.set_num_threads(setup.threads)
    cfg = method_config(method)
    torch.manual_seed(seed)
    tokenizer, model = llm_tasks.load_model(quick, cfg["init"], setup.rank)
    key = (quick, setup.task, setup.max_length, setup.batch_size, setup.val_size)
    if data_cache is not None and key in data_cache:
        data = data_cache[key]
    else:
        data = llm_tasks.load_data(tokenizer, setup.max_length, setup.batch_size, quick, setup.val_size, setup.task)
        if data_cache is not None:
            data_cache[key] = data
    pad = tokenizer.pad_token_id
    pairs = prism.find_trainables(model)[0]  # before FFA freezes lora_A (then they count as dense layers)
    methods.refactor(model, gauge)  # (A, B) -> (c A, B / c): Z unchanged
    if cfg.get("freeze_A"):
        methods.freeze(model, ".lora_A.")
    result = dict(method=method, target_epsilon=epsilon, seed=seed, lr=lr, gauge=gauge, setup=asdict(setup),
                  init=cfg["init"],
                  lora=dict(r=setup.rank, alpha=setup.rank, targets=list(llm_tasks.TARGETS), modules=len(pairs)),
                  train_size=len(data.train), val_size=len(data.val), test_size=len(data.test),
                  init_singular_values=init_summary(pairs))
    start = time.time()
    if method != "zeroshot":
        result.update(_train_loop(method, cfg, model, pairs, data, pad, setup, epsilon, seed, lr))
    result["train_seconds"] = round(time.time() - start, 1)
    t0 = time.time()
    val = llm_tasks.accuracy(model, data.val, data.answer_ids, pad)
    result.update(val_accuracy=val["accuracy"], val=val)
    if setup.test:
        test = llm_tasks.accuracy(model, data.test, data.answer_ids, pad)
        result.update(test_accuracy=test["accuracy"], test=test)
    result["eval_seconds"] = round(time.time() - t0, 1)
    return result


def _train_loop(method, cfg, model, pairs, data, pad, setup, epsilon, seed, lr) -> dict:
    n = len(data.train)
    sample_gen, noise_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    floor_factor = None
    if method == "nonprivate":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        info = {}
    else:
        from .methods import noise_multiplier  # cached calibration, as benchmarks.utility does

        sigma = noise_multiplier(epsilon, setup.delta, setup.batch_size / n, setup.steps)
        kwargs = dict(cfg["kwargs"])
        if cfg["cls"] == "PRISM":
            floor_factor = kwargs.get("floor_factor", 0.5)
        opt = _optimizer_class(cfg["cls"])(
            model, lr=lr, max_grad_norm=setup.max_grad_norm, noise_multiplier=sigma, delta=setup.delta,
            expected_batch_size=setup.batch_size, dataset_size=n, loss_reduction="sum", generator=noise_gen,
            **kwargs)
        info = dict(noise_multiplier=sigma, noise_std=opt.noise_std)
    loader = torch.utils.data.DataLoader(list(range(n)), batch_size=setup.batch_size, collate_fn=list)
    loader = prism.poisson_data_loader(loader, expected_batch_size=setup.batch_size, steps=setup.steps,
                                       generator=sample_gen)
    targets = torch.tensor([data.answer_ids[y] for y in data.train.labels])
    schedule = None
    if setup.lr_schedule == "linear":
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / setup.steps)
    log = StepLog(pairs, setup.steps)
    for batch in loader:
        batch = sorted(batch, key=lambda i: len(data.train.ids[i])) if len(batch) else []
        z_before = [z_matrix(p) for p in pairs]
        loss_total, norms = 0.0, []
        for s in range(0, len(batch), setup.micro_batch):
            index = batch[s:s + setup.micro_batch]
            loss = llm_tasks.loss_sum(model, [data.train.ids[i] for i in index], pad, targets[index])
            (loss / len(batch) if method == "nonprivate" else loss).backward()
            loss_total += loss.item()
            if method != "nonprivate" and opt.stats.last_norms is not None:
                norms += opt.stats.last_norms.float().tolist()
        clipped = opt.stats.clipped if method != "nonprivate" else 0
        examples = len(batch)
        opt.step()
        opt.zero_grad()
        if schedule is not None:
            schedule.step()
        log.record(loss_total, examples, clipped, norms, z_before, opt, floor_factor,
                   cfg.get("kwargs", {}).get("floor_mode", "scalar"))
        if not math.isfinite(loss_total) or len(log.rows) == setup.stop_after:
            break
    if method != "nonprivate":
        info["epsilon"] = opt.privacy_spent()[0]
    losses = [r["loss"] for r in log.rows]
    info.update(final_train_loss=statistics.mean(losses[-10:]), steps=log.rows,
                clipped_fraction=_mean([r["clipped_fraction"] for r in log.rows]),
                dZ_over_Z_mean={k: _mean([r[f"{k}.dZ_over_Z"].get("median") for r in log.rows])
                                for k in llm_tasks.TARGETS},
                dZ_mean={k: _mean([r[f"{k}.dZ"].get("median") for r in log.rows]) for k in llm_tasks.TARGETS})
    return info


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


# ---------------------------------------------------------------------------------------------- sweep

def run_path(folder: Path, stage: str, method: str, epsilon, seed: int, lr, gauge: float = 1.0) -> Path:
    if gauge == 1.0 and stage == "gauge":
        stage = "tune"  # the gauge sweep's c = 1 is the tuning run
    lr_tag = "none" if lr is None else f"{lr:g}"
    c_tag = "" if gauge == 1.0 else f"_c{gauge:g}"
    return folder / "llm" / stage / f"{method}{c_tag}_eps{common.epsilon_tag(epsilon)}_seed{seed}_lr{lr_tag}.json"


def eps_of(method, epsilon):
    return None if method in ("zeroshot", "nonprivate") else epsilon


def grid_of(method, args):
    if method == "zeroshot":
        return [None]
    return list(args.lr_grid or LR_GRID.get(method, DEFAULT_GRID))


def _tune_score(folder, method, args):
    return lambda lr: utility.read_score(run_path(folder, "tune", method, eps_of(method, args.tune_epsilon), 0, lr))


def tuning_grid(folder, method, args) -> list:
    """The method's grid, extended past the edge where its best validation accuracy lies (utility's rule)."""
    return utility.extended_grid(grid_of(method, args), _tune_score(folder, method, args), args.edge_steps)


def tuned_lr(folder, method, args):
    return utility.best_rate(tuning_grid(folder, method, args), _tune_score(folder, method, args))


def job(method, setup, epsilon, seed, lr, quick, cache, gauge=1.0):
    def fn():
        return train(method, setup, epsilon=epsilon, seed=seed, lr=lr, quick=quick, data_cache=cache, gauge=gauge)
    return fn


def sweep(args, folder, setup) -> None:
    cache = {}
    if args.stage == "probe":
        jobs = [(run_path(folder, f"probe{setup.stop_after or setup.steps}of{setup.steps}", m, eps_of(m, e), s, lr),
                 job(m, setup, eps_of(m, e), s, lr, args.quick, cache))
                for e in args.epsilons for s in args.seeds for lr in (args.lr_grid or [1e-2]) for m in args.methods
                if m != "zeroshot"]
        common.run_queue(list(dict(jobs).items()), "llm probes")
        return
    if args.stage == "gauge":
        setup, epsilon = replace(setup, test=False), args.tune_epsilon
        jobs = []
        for m in args.methods:
            lr = tuned_lr(folder, m, args) or (args.lr_grid or [None])[0]
            if lr is None or eps_of(m, epsilon) is None:
                print(f"{m}: not tuned yet (or not private); pass --lr-grid LR to sweep it at LR")
                continue
            jobs += [(run_path(folder, "gauge", m, epsilon, 0, lr, c), job(m, setup, epsilon, 0, lr, args.quick, cache, c))
                     for c in args.gauge_c]
        common.run_queue(jobs, "llm gauge sweep")
        return
    if args.stage == "tune":
        setup = replace(setup, test=False)  # tuning sees the validation split only
        while True:  # rate-major (every method at the grid's middle rate first), then the grid extensions
            order = utility.rate_major({m: tuning_grid(folder, m, args) for m in args.methods})
            jobs = [(run_path(folder, "tune", m, eps_of(m, args.tune_epsilon), 0, lr),
                     job(m, setup, eps_of(m, args.tune_epsilon), 0, lr, args.quick, cache)) for m, lr in order]
            if all(p.exists() for p, _ in jobs):
                return
            common.run_queue(jobs, "llm learning-rate tuning")
    jobs, stage = [], "test" if setup.task == "rotten_tomatoes" else f"{setup.task}-test"
    for seed in args.seeds:
        for epsilon in args.epsilons:
            for m in args.methods:
                lr = None if m == "zeroshot" else tuned_lr(folder, m, args)
                if lr is None and m != "zeroshot":
                    print(f"{m}: not tuned yet, skipped")
                    continue
                e = eps_of(m, epsilon)
                if e is None and epsilon != args.epsilons[0]:
                    continue
                jobs.append((run_path(folder, stage, m, e, seed, lr), job(m, setup, e, seed, lr, args.quick, cache)))
    common.run_queue(jobs, "llm test runs")


def table(folder: Path) -> str:
    """Markdown: every result file under results/llm, one row each: accuracies, the validation answer loss (the
    two answers renormalised), the final training loss,
    the mean clipped fraction, ||dZ|| / ||Z|| (median over modules) at the first and the last step, and
    the second moments at the last step over noise_std^2 (PRISM: median eigenvalue of V_A on q_proj and
    the fraction of all eigenvalues below the floor; naive: median per-coordinate moment of lora_B)."""
    lines = ["| stage | method | eps | seed | lr | val | val answer loss | test | final loss | clipped | "
             "dZ/Z q first-last | dZ/Z v first-last | V/std^2 q | below floor | s |", "|---" * 15 + "|"]

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    for path in sorted((folder / "llm").glob("*/*.json")):
        r = common.read_json(path)
        steps = r.get("steps") or []
        first, last = (steps[0], steps[-1]) if steps else ({}, {})

        def dz(row, kind):
            return (row.get(f"{kind}.dZ_over_Z") or {}).get("median")
        moments = last.get("moments") or {}
        eig = (moments.get("q_proj.eig_A") or moments.get("q_proj.v_A") or {}).get("median")
        two_sided = method_config(r["method"]).get("kwargs", {}).get("preconditioner") == "two_sided"
        below = [] if two_sided else [v["below_floor"] for k, v in moments.items() if "below_floor" in v]
        gauge = f" (c = {r['gauge']:g})" if r.get("gauge", 1.0) != 1.0 else ""
        lines.append(
            f"| {path.parent.name} | {r['method']}{gauge} | {common.epsilon_tag(r['target_epsilon'])} | {r['seed']} | {f(r['lr'], 'g')} | "
            f"{100 * r['val_accuracy']:.1f} | {f(r.get('val', {}).get('answer_loss'), '.3f')} | "
            f"{f(r.get('test_accuracy') and 100 * r['test_accuracy'], '.1f')} | "
            f"{f(r.get('final_train_loss'), '.3f')} | {f(r.get('clipped_fraction'), '.2f')} | "
            f"{f(dz(first, 'q_proj'), '.3f')}-{f(dz(last, 'q_proj'), '.3f')} | "
            f"{f(dz(first, 'v_proj'), '.3f')}-{f(dz(last, 'v_proj'), '.3f')} | {f(eig, '.3f')} | "
            f"{f(statistics.mean(below) if below else None, '.2f')} | {r.get('seconds', '')} |")
    return "\n".join(lines)


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=STAGES, default="tune")
    p.add_argument("--task", choices=list(llm_tasks.PROMPTS), default="rotten_tomatoes",
                   help="the task; all but rotten_tomatoes run the test stage only, at rotten_tomatoes' tuned rates")
    p.add_argument("--methods", nargs="+", choices=METHODS,
                   default=["zeroshot", "nonprivate", "prism", "naive", "prism_f5", "naive_default", "ffa"])
    p.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    p.add_argument("--tune-epsilon", type=float, default=TUNE_EPSILON,
                   help="the epsilon of the tuning stage (other values: diagnostics; the test stage reads the "
                        "learning rates tuned at this one)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--lr-grid", nargs="+", type=float, default=None, help="one grid for every method")
    p.add_argument("--edge-steps", type=int, default=1)
    p.add_argument("--gauge-c", nargs="+", type=float, default=list(GAUGE_C), help="the gauge stage's factors c")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop training after this many steps (noise still calibrated for --steps)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--val-size", type=int, default=None)
    p.add_argument("--no-test", action="store_true", help="score the validation split only")
    p.add_argument("--lr-schedule", choices=["constant", "linear"], default="constant",
                   help="linear: decay to 0 over the steps, as the HF Trainer does by default; its runs go to "
                        "<results>/linear-decay/llm/ (a separate protocol: tuned and tested there)")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    if args.task != "rotten_tomatoes" and args.stage != "test" and not args.summary_only:
        p.error(f"--task {args.task} runs the test stage only (--stage test): the learning rates are tuned on "
                "rotten_tomatoes, the issue's protocol")
    common.quiet()
    setup = replace(QUICK if args.quick else Setup(), task=args.task)
    setup = replace(setup, **{k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size,
                                                     val_size=args.val_size, stop_after=args.stop_after).items() if v is not None})
    if args.no_test:
        setup = replace(setup, test=False)
    setup = replace(setup, lr_schedule=args.lr_schedule)
    if args.quick:
        args.epsilons, args.seeds, args.edge_steps = [8.0], [0], 0
        args.lr_grid = args.lr_grid or [1e-2]
    folder = common.out_dir(args)
    if args.lr_schedule != "constant":
        folder = folder / f"{args.lr_schedule}-decay"
    if not args.summary_only:
        sweep(args, folder, setup)
    text = table(folder)
    print(text)
    return text


if __name__ == "__main__":
    main()
