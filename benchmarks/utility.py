"""Privacy-utility: test accuracy of PRISM, naive DP-LoRA, Opacus, FFA-LoRA, non-private LoRA and a DP head.

    python -m benchmarks.utility            # full sweep, resumable: rerun to continue
    python -m benchmarks.utility --quick    # CI: a few steps per method, no claims

Stage 1 tunes the learning rate of every method on the validation split, at epsilon 3 (non-private:
without noise) and seed 0, over the same grid for all; where a method's best rate lies on an edge of
the grid, its grid is extended one rate past that edge (the same rule for every method, at most
--edge-steps rates). Stage 2 runs each method at its tuned rate
for every epsilon and seed (the tuning run is the epsilon-3, seed-0 run). Each run writes
results/utility/<task>/<method>_eps<epsilon>_seed<seed>_lr<lr>.json; the summary (mean +- std of
the test accuracy over seeds) goes to results/utility.json and results/utility.png.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Callable

from . import common, methods, tasks

LR_GRID = (3e-3, 1e-2, 3e-2)
EPSILONS = (1.0, 3.0, 8.0)
TUNE_EPSILON = 3.0
SEEDS = (0, 1, 2)
EDGE_STEPS = 2


def run_path(folder: Path, task: str, method: str, epsilon: float | None, seed: int, lr: float) -> Path:
    return folder / "utility" / task / f"{method}_eps{common.epsilon_tag(epsilon)}_seed{seed}_lr{lr:g}.json"


def epsilons_of(method: str, epsilons) -> list[float | None]:
    return [None] if method == "nonprivate" else list(epsilons)


def job(task, method, epsilon, seed, lr, split, setup):
    def fn():
        result = methods.train(method, split, setup, epsilon=epsilon, seed=seed, lr=lr)
        result.update(task=task)
        return result
    return fn


def center_first(grid) -> list[float]:
    """The grid from its middle outwards: an unfinished tuning stage still compares all methods at one rate."""
    grid = sorted(grid)
    middle = (len(grid) - 1) / 2
    return sorted(grid, key=lambda lr: (abs(grid.index(lr) - middle), -lr))


def rate_major(grids: dict) -> list[tuple[str, float | None]]:
    """(method, rate) pairs: every method's grid centre-first ([None]: no rate), the first rate of every method,
    then the second, ...: an unfinished tuning stage has compared all methods at the same rates."""
    ordered = {m: g if g == [None] else center_first(g) for m, g in grids.items()}
    return [(m, g[i]) for i in range(max(map(len, ordered.values()), default=0)) for m, g in ordered.items()
            if i < len(g)]


def tune_epsilon(method: str) -> float | None:
    return None if method == "nonprivate" else TUNE_EPSILON


def rate_past(edge: float, neighbour: float) -> float:
    """The next rate past an edge of the grid: about edge^2 / neighbour (one more step of the grid's
    spacing), rounded in log scale to the nearest 1 or 3 x 10^k strictly beyond the edge (3e-2 next to
    1e-2 gives 1e-1; 3e-3 next to 1e-2 gives 1e-3)."""
    target = 2 * math.log10(edge) - math.log10(neighbour)
    decade = math.floor(target)
    nice = [float(f"{d}e{k}") for k in range(decade - 2, decade + 3) for d in (1, 3)]
    beyond = [lr for lr in nice if (lr - edge) * (edge - neighbour) > 0]
    return min(beyond, key=lambda lr: abs(math.log10(lr) - target))


def extended_grid(grid, score: Callable[[float], float | None], edge_steps: int = EDGE_STEPS) -> list[float]:
    """The rates a method is tuned over: `grid`, extended by one rate past an edge for as long as the best
    score (score(lr): the tuning run's validation score, higher is better; None while that run is missing)
    lies on that edge, by at most `edge_steps` rates. An optimum on the edge of a grid is an artefact of
    where the grid ends; the rule is the same for every method, so the comparison stays fair. Rates whose
    tuning run is missing are in the grid; the extension waits for them."""
    grid, base = sorted(grid), len(grid)
    while len(grid) > 1 and len(grid) - base < edge_steps:
        scores = {lr: score(lr) for lr in grid}
        if any(v is None for v in scores.values()):
            break
        best = max(grid, key=scores.get)
        if best == grid[0]:
            grid.insert(0, rate_past(grid[0], grid[1]))
        elif best == grid[-1]:
            grid.append(rate_past(grid[-1], grid[-2]))
        else:
            break
    return grid


def best_rate(grid, score: Callable[[float], float | None]) -> float | None:
    """The rate of `grid` with the best score, or None while a tuning run is missing."""
    scores = {lr: score(lr) for lr in grid}
    return None if any(v is None for v in scores.values()) else max(grid, key=scores.get)


def read_score(path: Path, key: str = "val_accuracy", sign: float = 1.0) -> float | None:
    """sign * the result file's `key`, or None if the run has not finished."""
    return sign * common.read_json(path)[key] if path.exists() else None


def tuning_grid(folder: Path, task: str, method: str, grid, edge_steps: int = EDGE_STEPS) -> list[float]:
    """The method's tuning grid on `task` (extended_grid on its validation accuracy)."""
    return extended_grid(grid, lambda lr: read_score(run_path(folder, task, method, tune_epsilon(method), 0, lr)),
                         edge_steps)


def tuned_lr(folder: Path, task: str, method: str, grid, edge_steps: int = EDGE_STEPS) -> float | None:
    """The rate of the method's tuning grid with the best validation accuracy, or None while a tuning run is missing."""
    return best_rate(tuning_grid(folder, task, method, grid, edge_steps),
                     lambda lr: read_score(run_path(folder, task, method, tune_epsilon(method), 0, lr)))


def sweep(args, folder: Path, setup: methods.Setup) -> None:
    for task in args.tasks:
        split = tasks.load_task(task, setup.batch_size, quick=args.quick)
        print(f"{task}: {len(split.train_x)} train / {len(split.val_x)} validation / {len(split.test_x)} test")
        while True:  # one round per extension of a method's grid
            rates = [(m, lr) for lr in center_first(args.lr_grid) for m in args.methods]
            rates += [(m, lr) for m in args.methods for lr in tuning_grid(folder, task, m, args.lr_grid, args.edge_steps)
                      if lr not in args.lr_grid]
            tune = [(run_path(folder, task, m, tune_epsilon(m), 0, lr), job(task, m, tune_epsilon(m), 0, lr, split, setup))
                    for m, lr in rates]
            if all(path.exists() for path, _ in tune):
                break
            common.run_queue(tune, f"{task} learning-rate tuning")
        final = []
        for seed in args.seeds:
            for epsilon in sorted(args.epsilons, key=lambda e: (e != TUNE_EPSILON, e)):
                for m in args.methods:
                    lr = tuned_lr(folder, task, m, args.lr_grid, args.edge_steps)
                    if lr is not None and (m != "nonprivate" or epsilon == TUNE_EPSILON):
                        e = None if m == "nonprivate" else epsilon
                        final.append((run_path(folder, task, m, e, seed, lr), job(task, m, e, seed, lr, split, setup)))
        common.run_queue(final, f"{task} test runs")


def summarize(args, folder: Path) -> dict:
    """results/utility.json: tuning table and mean +- std test accuracy per (task, method, epsilon)."""
    summary = dict(lr_grid=list(args.lr_grid), tuning={}, test_accuracy={})
    for task in args.tasks:
        summary["tuning"][task], summary["test_accuracy"][task] = {}, {}
        for m in args.methods:
            paths = {lr: run_path(folder, task, m, tune_epsilon(m), 0, lr)
                     for lr in tuning_grid(folder, task, m, args.lr_grid, args.edge_steps)}
            summary["tuning"][task][m] = {f"{lr:g}": common.read_json(p)["val_accuracy"] if p.exists() else None
                                          for lr, p in paths.items()}
            rows = summary["test_accuracy"][task][m] = {}
            lr = tuned_lr(folder, task, m, args.lr_grid, args.edge_steps)
            if lr is None:
                continue
            for epsilon in epsilons_of(m, args.epsilons):
                runs = [common.read_json(p) for seed in args.seeds
                        if (p := run_path(folder, task, m, epsilon, seed, lr)).exists()]
                if runs:
                    acc = [r["test_accuracy"] for r in runs]
                    std = statistics.stdev(acc) if len(acc) > 1 else None  # sample std over seeds
                    rows[common.epsilon_tag(epsilon)] = dict(lr=lr, mean=statistics.mean(acc), std=std,
                                              seeds=[r["seed"] for r in runs], test_accuracy=acc,
                                              epsilon_spent=[r.get("epsilon") for r in runs])
    common.write_json(folder / "utility.json", summary)
    return summary


def table(summary: dict, epsilons) -> str:
    """Markdown: validation accuracy (%) of the tuning runs, then one row per (task, method) with the
    mean +- sample std test accuracy (%) at the tuned learning rate and the number of seeds."""
    rates = {float(lr) for by_method in summary["tuning"].values() for accs in by_method.values() for lr in accs}
    grid = [f"{lr:g}" for lr in sorted(rates | set(summary["lr_grid"]))]
    lines = [f"validation accuracy at epsilon {TUNE_EPSILON:g} (non-private: no noise), seed 0"
             " (blank: outside the method's grid):", "",
             "| task | method | " + " | ".join(f"lr {lr}" for lr in grid) + " |", "|---" * (len(grid) + 2) + "|"]
    for task, by_method in summary["tuning"].items():
        for m, accs in by_method.items():
            cells = ["" if lr not in accs else "pending" if accs[lr] is None else f"{100 * accs[lr]:.1f}"
                     for lr in grid]
            lines.append(f"| {task} | {m} | " + " | ".join(cells) + " |")
    columns = [common.epsilon_tag(e) for e in epsilons]
    lines += ["", "test accuracy at the tuned learning rate:", "",
              "| task | method | " + " | ".join(f"eps {c}" for c in columns) + " | non-private |",
              "|---" * (len(columns) + 3) + "|"]
    for task, by_method in summary["test_accuracy"].items():
        for m, rows in by_method.items():
            cells = [_cell(rows.get(c)) for c in columns] if m != "nonprivate" else ["" for _ in columns]
            cells.append(_cell(rows.get("inf")) if m == "nonprivate" else "")
            lines.append(f"| {task} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row) -> str:
    if row is None:
        return "pending"
    spread = "" if row["std"] is None else f" ± {100 * row['std']:.1f}"
    return f"{100 * row['mean']:.1f}{spread} (n={len(row['seeds'])})"


def plot(summary: dict, path: Path) -> None:
    plt = common.maybe_pyplot()
    if plt is None:
        return
    names = list(summary["test_accuracy"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, task in zip(axes[0], names):
        for m, rows in summary["test_accuracy"][task].items():
            if m == "nonprivate" and "inf" in rows:
                ax.axhline(100 * rows["inf"]["mean"], color="k", linestyle="--", label="non-private")
                continue
            points = sorted((float(e), r) for e, r in rows.items())
            if points:
                ax.errorbar([e for e, _ in points], [100 * r["mean"] for _, r in points],
                            yerr=[100 * (r["std"] or 0.0) for _, r in points], marker="o", capsize=3, label=m)
        ax.set(xscale="log", xlabel="epsilon (delta = 1e-5)", ylabel="test accuracy (%)", title=task)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "pending (learning-rate tuning)", ha="center", transform=ax.transAxes)
    common.save_figure(fig, path)


def everything(args) -> argparse.Namespace:
    """args widened to every task, method, epsilon and seed: a run restricted to a few (e.g. `--methods prism
    --seeds 1`) still rewrites the whole summary, not one that forgets the others' results."""
    available = [m for m in methods.METHODS if m not in methods.OPACUS_METHODS or methods.opacus_available()]
    return argparse.Namespace(**{**vars(args), "tasks": list(dict.fromkeys([*tasks.TASKS, *args.tasks])),
                                 "methods": list(dict.fromkeys([*available, *args.methods])),
                                 "epsilons": sorted(set(EPSILONS) | set(args.epsilons)),
                                 "seeds": sorted(set(SEEDS) | set(args.seeds))})


def main(argv=None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=tasks.TASKS, default=list(tasks.TASKS))
    p.add_argument("--methods", nargs="+", choices=methods.METHODS, default=list(methods.METHODS))
    p.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--lr-grid", nargs="+", type=float, default=list(LR_GRID))
    p.add_argument("--edge-steps", type=int, default=EDGE_STEPS,
                   help="at most this many rates added to a method's grid past the edge its optimum lies on")
    p.add_argument("--max-grad-norm", type=float, default=methods.Setup.max_grad_norm, help="C")
    p.add_argument("--dense-max-grad-norm", type=float, default=None,
                   help="C_D, the head's scale in prism's joint clip (prism, naive, ffa only; use with --out)")
    p.add_argument("--floor-mode", choices=("scalar", "geometry"), default=methods.Setup.floor_mode,
                   help="PRISM's second-moment floor (prism only; use with --out)")
    p.add_argument("--floor-factor", type=float, default=methods.Setup.floor_factor,
                   help="f in PRISM's floor f * std^2 (prism only; use with --out)")
    p.add_argument("--summary-only", action="store_true", help="only rebuild the summary, table and plot")
    args = p.parse_args(argv)
    common.quiet()
    if args.quick:
        args.epsilons, args.seeds, args.lr_grid, args.edge_steps = [TUNE_EPSILON], [0], [3e-3], 0
    if set(methods.OPACUS_METHODS) & set(args.methods) and not methods.opacus_available():
        print("opacus is not installed (pip install 'prism-dp[bench]'): skipping the Opacus and head baselines")
        args.methods = [m for m in args.methods if m not in methods.OPACUS_METHODS]
    folder = common.out_dir(args)
    if not args.summary_only:
        setup = replace(methods.QUICK if args.quick else methods.Setup(), max_grad_norm=args.max_grad_norm,
                        dense_max_grad_norm=args.dense_max_grad_norm, floor_mode=args.floor_mode,
                        floor_factor=args.floor_factor)
        sweep(args, folder, setup)
    scope = args if args.quick else everything(args)
    summary = summarize(scope, folder)
    print(table(summary, scope.epsilons))
    plot(summary, folder / "utility.png")
    return summary


if __name__ == "__main__":
    main()
