"""Gauge sensitivity: the same starting model factored as (c A, B / c), c in {0.01, 0.1, 1, 10, 100}.

    python -m benchmarks.gauge            # resumable: rerun to continue
    python -m benchmarks.gauge --quick    # CI: a few steps, no claims

Every method starts from the same PiSSA adapter Z = A B^T (so the same model), re-factored by c.
1. Accuracy: the epsilon-3 Rotten Tomatoes run of each method at its tuned learning rate
   (results/utility, seed 0; or --lr), one JSON per (method, c, lr) under results/gauge/.
2. Noise energy in Z per step: one real optimizer step with no example (clipped sums 0, so the
   update is the noise alone), DP-SGD form (adaptive=False) with a small learning rate eta, in
   float64; E ||Z+ - Z||_F^2 / eta^2 summed over the LoRA modules, against the closed forms
   PRISM   std^2 r (m + n - r)                               (per module, whatever c)
   naive   std^2 (m ||B||^2 + n ||A||^2) + eta^2 std^4 m n r  (A = lora_B.weight, B = lora_A.weight^T)
   FFA     std^2 m ||B||^2                                    (only lora_B = A is noised)
   with std = sigma C / b. Opacus adds the same N(0, std^2) per factor coordinate as naive.
Summary: results/gauge.json and results/gauge.png.
"""

from __future__ import annotations

import statistics

import torch

import prism
from prism.pipeline.noise import noise_energy

from . import common, methods, tasks, utility

C_VALUES = (0.01, 0.1, 1.0, 10.0, 100.0)
ACCURACY_METHODS = ("prism", "naive", "opacus", "ffa")
NOISE_METHODS = ("prism", "naive", "ffa")
TASK = "rotten_tomatoes"
EPSILON = 3.0
ETA = 1e-3


def accuracy_jobs(args, folder, setup, split):
    jobs = []
    for m in args.methods:
        lr = args.lr or (3e-3 if args.quick else utility.tuned_lr(folder, TASK, m, utility.LR_GRID))
        if lr is None:
            print(f"{m}: its learning rate is not tuned yet (run benchmarks.utility first); skipping")
            continue
        for c in args.c:
            def fn(m=m, c=c, lr=lr):
                result = methods.train(m, split, setup, epsilon=EPSILON, seed=0, lr=lr, full_rank=True, gauge=c)
                result.update(task=TASK)
                return result
            jobs.append((folder / "gauge" / f"{m}_c{c:g}_seed0_lr{lr:g}.json", fn))
    return jobs


def lora_factors(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lora_B.weight, lora_A.weight) of every LoRA module, whichever of them is trainable."""
    from peft.tuners.lora import LoraLayer

    return [(layer.lora_B["default"].weight, layer.lora_A["default"].weight)
            for layer in model.modules() if isinstance(layer, LoraLayer)]


@torch.no_grad()
def noise_energy_run(method: str, c: float, sigma: float, setup: methods.Setup, trials: int) -> dict:
    """Measured E ||Z+ - Z||^2 / eta^2 of a noise-only step, and its closed form, over all LoRA modules."""
    torch.manual_seed(0)
    model = tasks.minilm(True, setup.rank)[1].double()
    methods.refactor(model, c)
    if method == "ffa":
        for A_weight, B_weight in lora_factors(model):
            B_weight.requires_grad_(False)
    cls = prism.PRISM if method == "prism" else prism.NaiveDPLoRA
    opt = cls(model, lr=ETA, max_grad_norm=setup.max_grad_norm, noise_multiplier=sigma,
              expected_batch_size=setup.batch_size, adaptive=False, generator=torch.Generator().manual_seed(c_seed(c)))
    factors = lora_factors(model)  # after PRISM's balanced re-factoring (Z unchanged)
    start = [(A.clone(), B.clone()) for A, B in factors]
    std = opt.noise_std
    closed = 0.0
    for A, Bt in factors:
        (m, r), n = A.shape, Bt.shape[1]
        if method == "prism":
            closed += noise_energy(std, m, n, r)
        elif method == "naive":
            closed += (std ** 2 * (m * Bt.square().sum().item() + n * A.square().sum().item())
                       + ETA ** 2 * std ** 4 * m * n * r)
        else:
            closed += std ** 2 * m * Bt.square().sum().item()
    energies = []
    for _ in range(trials):
        for (A, Bt), (A0, Bt0) in zip(factors, start):
            A.copy_(A0)
            Bt.copy_(Bt0)
        opt.step()
        energies.append(sum((A @ Bt - A0 @ Bt0).square().sum().item() for (A, Bt), (A0, Bt0) in zip(factors, start))
                        / ETA ** 2)
    return dict(method=method, c=c, noise_std=std, eta=ETA, trials=trials, measured=statistics.mean(energies),
                measured_sem=statistics.stdev(energies) / trials ** 0.5 if trials > 1 else 0.0, closed_form=closed,
                modules=len(factors))


def c_seed(c: float) -> int:
    return int(round(1000 * c))


def summarize(folder) -> dict:
    accuracy: dict[str, dict[str, float]] = {}  # "method lr=...": {c: test accuracy}
    for path in sorted((folder / "gauge").glob("*_c*_seed0_lr*.json")):
        run = common.read_json(path)
        accuracy.setdefault(f"{run['method']} lr={run['lr']:g}", {})[f"{run['gauge']:g}"] = run["test_accuracy"]
    summary = dict(task=TASK, epsilon=EPSILON, test_accuracy=accuracy,
                   noise_energy=common.read_json(folder / "gauge" / "noise_energy.json"))
    common.write_json(folder / "gauge.json", summary)
    return summary


def _color(method: str) -> str:
    """One colour per method in both panels."""
    return f"C{methods.METHODS.index(method)}"


def plot(summary: dict, path) -> None:
    plt = common.maybe_pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for m, rows in summary["test_accuracy"].items():
        points = sorted((float(c), a) for c, a in rows.items())
        if points:
            left.plot([c for c, _ in points], [100 * a for _, a in points], marker="o", label=m,
                      color=_color(m.split()[0]))
    left.set(xscale="log", xlabel="c in (cA, B/c)", ylabel="test accuracy (%)",
             title=f"{summary['task']}, epsilon {summary['epsilon']:g}")
    if left.lines:
        left.legend()
    else:
        left.text(0.5, 0.5, "accuracy runs pending", ha="center", transform=left.transAxes)
    for m, rows in summary["noise_energy"]["runs"].items():
        cs = sorted(rows, key=float)
        color = _color(m)
        right.plot([float(c) for c in cs], [rows[c]["measured"] for c in cs], "o", color=color, label=f"{m} measured")
        right.plot([float(c) for c in cs], [rows[c]["closed_form"] for c in cs], "-", color=color,
                   label=f"{m} closed form")
    right.set(xscale="log", yscale="log", xlabel="c in (cA, B/c)", ylabel="E ||noise in Z||_F^2 per step / eta^2",
              title="noise energy in Z (all LoRA modules)")
    right.legend(fontsize=8)
    common.save_figure(fig, path)


def main(argv=None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=ACCURACY_METHODS, default=list(ACCURACY_METHODS))
    p.add_argument("--c", nargs="+", type=float, default=list(C_VALUES))
    p.add_argument("--trials", type=int, default=50, help="noise-only steps per (method, c) (default: 50)")
    p.add_argument("--skip-accuracy", action="store_true", help="only measure the noise energy")
    p.add_argument("--lr", type=float, default=None,
                   help="one learning rate for every method (default: each method's tuned rate from utility.py)")
    args = p.parse_args(argv)
    common.quiet()
    if args.quick:
        args.c, args.trials = [0.1, 10.0], 3
        args.methods = [m for m in args.methods if m in ("prism", "naive")]
    if "opacus" in args.methods and not methods.opacus_available():
        print("opacus is not installed (pip install 'prism-dp[bench]'): skipping the Opacus baseline")
        args.methods = [m for m in args.methods if m != "opacus"]
    folder = common.out_dir(args)
    setup = methods.QUICK if args.quick else methods.Setup()
    split = tasks.load_task(TASK, setup.batch_size, quick=args.quick)
    noise_path = folder / "gauge" / "noise_energy.json"
    if not noise_path.exists():
        sigma = methods.noise_multiplier(EPSILON, setup.delta, setup.batch_size / len(split.train_x), setup.steps)
        runs = {m: {f"{c:g}": noise_energy_run(m, c, sigma, setup, args.trials) for c in args.c}
                for m in (NOISE_METHODS[:2] if args.quick else NOISE_METHODS)}
        common.write_json(noise_path, dict(noise_multiplier=sigma, runs=runs, **common.provenance()))
    for m, rows in common.read_json(noise_path)["runs"].items():
        print(f"noise energy {m}: " + ", ".join(f"c={c}: {r['measured']:.4g} (closed form {r['closed_form']:.4g})"
                                                for c, r in rows.items()))
    if not args.skip_accuracy:
        common.run_queue(accuracy_jobs(args, folder, setup, split), "gauge accuracy runs")
    summary = summarize(folder)
    plot(summary, folder / "gauge.png")
    return summary


if __name__ == "__main__":
    main()
