"""One-run privacy audit of PRISM and NaiveDPLoRA: epsilon_lower against the reported epsilon.

    python -m benchmarks.audit            # 3 seeds, 2000 canaries, 200 steps: about 3 CPU-minutes
    python -m benchmarks.audit --quick    # 1 seed, 1000 canaries, 50 steps: under a minute

For each method and epsilon in {1, 4, 8} (delta = 1e-5), and with the noise off, one training run
with prism.audit.audit: the toy task of tests/canaries.py (a bag-of-tokens classifier with one
LoRA layer, n data examples, m canaries that each repeat a token nobody else uses, with a random
label), Poisson sampling at q = 0.1, each canary in with probability 1/2, scored by its loss
decrease, guesses on the m/10 highest and m/10 lowest scores, 95% confidence. A last row audits a
deliberately broken PRISM whose noise is 20x smaller than what its accountant is told, at
epsilon 1: the audit should catch it. The noise comes from each optimizer's default generator
(OS entropy), so reruns differ a little. Writes benchmarks/results/audit.json (--quick: under
results/tmp/quick, which git ignores).
"""

from __future__ import annotations

import sys
import time

import torch

import prism
from prism.audit import audit

from . import common

sys.path.insert(0, str(common.ROOT / "tests"))
from canaries import audit_task, per_example_loss  # noqa: E402

DELTA = 1e-5
RATE = 0.1
EPSILONS = (1.0, 4.0, 8.0)


class BrokenPRISM(prism.PRISM):
    """PRISM with a planted bug: noise 20x smaller than the accountant is told."""

    @property
    def noise_std(self) -> float:
        return super().noise_std / 20


def run(method: type, sigma: float, seed: int, n: int, m: int, steps: int) -> dict:
    model, data, canaries = audit_task(n, m, seed=seed)
    optimizer = method(model, lr=0.05, max_grad_norm=0.5, noise_multiplier=sigma, delta=DELTA, sample_rate=RATE,
                       expected_batch_size=RATE * (n + m / 2), loss_reduction="sum")
    start = time.perf_counter()
    result = audit(model, optimizer, canaries, per_example_loss, steps=steps, data=data,
                   generator=torch.Generator().manual_seed(1000 + seed))
    with torch.no_grad():
        accuracy = (model(input_ids=data[0]).argmax(-1) == data[1]).float().mean().item()
    return dict(epsilon_lower=result.epsilon_lower, epsilon_reported=result.epsilon_reported,
                correct=result.correct, guesses=result.guesses, train_accuracy=accuracy,
                seconds=time.perf_counter() - start)


def main() -> None:
    args = common.parser(__doc__.split("\n\n")[0]).parse_args()
    common.quiet()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds synchronisation
    seeds, n, m, steps = ((0,), 1000, 1000, 50) if args.quick else ((0, 1, 2), 2000, 2000, 200)
    sigmas = {eps: prism.calibrate_noise_multiplier(eps, DELTA, RATE, steps, tolerance=0.01) for eps in EPSILONS}
    methods = (("PRISM", prism.PRISM), ("NaiveDPLoRA", prism.NaiveDPLoRA))
    cases = [(name, method, eps, sigmas[eps]) for name, method in methods for eps in EPSILONS]
    cases += [(name, method, None, 0.0) for name, method in methods]
    cases.append(("PRISM, noise/20 (planted bug)", BrokenPRISM, 1.0, sigmas[1.0]))
    rows = []
    print(f"{'method':30} {'target eps':>10} {'sigma':>6} {'reported':>9} {'eps_lower per seed':>22} "
          f"{'correct/guesses per seed':>26} {'train acc':>9}")
    for name, method, target, sigma in cases:
        runs = [run(method, sigma, seed, n, m, steps) for seed in seeds]
        rows.append(dict(method=name, target_epsilon=target, noise_multiplier=sigma, runs=runs))
        lowers = " ".join(f"{r['epsilon_lower']:.2f}" for r in runs)
        counts = " ".join(f"{r['correct']}/{r['guesses']}" for r in runs)
        print(f"{name:30} {target if target else '-':>10} {sigma:6.3f} {runs[0]['epsilon_reported']:9.3f} "
              f"{lowers:>22} {counts:>26} {sum(r['train_accuracy'] for r in runs) / len(runs):9.3f}", flush=True)
    out = common.out_dir(args) / "audit.json"
    common.write_json(out, dict(config=dict(data_examples=n, canaries=m, steps=steps, sample_rate=RATE, delta=DELTA,
                                            confidence=0.95, guesses=f"{m // 10} highest + {m // 10} lowest scores",
                                            seeds=list(seeds)),
                                rows=rows, **common.provenance()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
