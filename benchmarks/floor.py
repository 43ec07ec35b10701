"""How often PRISM's DP-aware floor binds: the second moments' eigenvalues against the noise's.

    python -m benchmarks.floor            # floor factors 0, 0.5, 5; 10 steps each
    python -m benchmarks.floor --quick    # CI: a few steps, no claims

PRISM preconditions each side of a LoRA module by V_hat^{-1/2}, V_hat the bias-corrected r x r second
moment of the privatised factor directions, with its eigenvalues raised to the floor f std^2 (docs/method.md
3.5; std = sigma C / b). The benchmark's Rotten Tomatoes run (epsilon 3, seed 0, lr 1e-2) is trained for
a few steps per floor factor f; after every step the eigenvalues of every module's V_hat are read from
the optimizer's state, in units of std^2. The fraction below f is the share of directions whose step the
floor shrinks; with every eigenvalue below f the preconditioner is the scalar 1 / (sqrt(f) std) and PRISM's
LoRA step is momentum SGD on the tangent space. Writes results/floor.json.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, replace

import torch

from . import common, methods, tasks

FLOOR_FACTORS = (0.0, 0.5, 5.0)
TASK, EPSILON, SEED, LR = "rotten_tomatoes", 3.0, 0, 1e-2


def second_moment_eigenvalues(opt) -> list[float]:
    """Eigenvalues of every LoRA module's bias-corrected second moments (both sides), over std^2."""
    beta2 = opt.param_groups[0]["betas"][1]
    values = []
    for pair in opt.pairs:
        state = opt.state[pair.lora_B.weight]
        for key in ("exp_avg_sq_A", "exp_avg_sq_B"):
            V_hat = state[key] / (1 - beta2 ** state["step"])
            values += torch.linalg.eigvalsh((V_hat + V_hat.mT) / 2).div(opt.noise_std ** 2).tolist()
    return values


def run(floor_factor: float, setup: methods.Setup, split) -> dict:
    per_step = []

    def record(opt):
        lam = second_moment_eigenvalues(opt)
        per_step.append(dict(step=len(per_step) + 1, median=statistics.median(lam), min=min(lam), max=max(lam),
                             below_floor=sum(v < floor_factor for v in lam) / len(lam)))
        row = per_step[-1]
        print(f"  f={floor_factor:g} step {row['step']}: eigenvalues / std^2 median {row['median']:.3f} "
              f"(min {row['min']:.3f}, max {row['max']:.3f}); below the floor {row['below_floor']:.2f}", flush=True)

    setup = replace(setup, floor_factor=floor_factor)
    result = methods.train("prism", split, setup, epsilon=EPSILON, seed=SEED, lr=LR, after_step=record)
    return dict(floor_factor=floor_factor, steps=per_step, final_train_loss=result["final_train_loss"],
                noise_multiplier=result["noise_multiplier"])


def main(argv=None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--floor-factors", nargs="+", type=float, default=list(FLOOR_FACTORS))
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    common.quiet()
    setup = replace(methods.QUICK if args.quick else methods.Setup(), log_every=0)
    setup = replace(setup, steps=min(args.steps, setup.steps))
    split = tasks.load_task(TASK, setup.batch_size, quick=args.quick)
    summary = dict(task=TASK, epsilon=EPSILON, seed=SEED, lr=LR, setup=asdict(setup),
                   runs=[run(f, setup, split) for f in args.floor_factors], **common.provenance())
    path = common.out_dir(args) / "floor.json"
    common.write_json(path, summary)
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
