"""Per-step diagnostics of the LLM benchmark's runs (benchmarks.llm): how far each step moves Z = A B^T per
module kind, the clipping statistics, and the optimizers' second moments against the noise level.

All read-only: nothing here changes a run. Values are rounded to 4 significant digits for the result files.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from . import llm_tasks


def _module_kind(name: str) -> str:
    return next((t for t in llm_tasks.TARGETS if t in name), "other")


@torch.no_grad()
def z_matrix(pair) -> torch.Tensor:
    return (pair.lora_B.weight.float() @ pair.lora_A.weight.float())


def _quantiles(values) -> dict:
    values = sorted(values)
    if not values:
        return {}
    return dict(median=statistics.median(values), min=values[0], max=values[-1])


def _round(x, digits=4):
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    return x


def _floors(pair, floor_factor: float, floor_mode: str) -> dict:
    """The floor of each side's eigenvalues in units of noise_std^2 (method.md 3.5; "geometry": the mean
    eigenvalue of the lifted noise, f tr(N^-1)/r (m - r)/m for A and f tr(M^-1)/r (n - r)/n for B)."""
    if floor_mode != "geometry":
        return dict(A=floor_factor, B=floor_factor)
    A, B = pair.lora_B.weight.double(), pair.lora_A.weight.double().T
    (m, r), n = A.shape, B.shape[0]
    M, N = A.T @ A, B.T @ B
    return dict(A=floor_factor * float(torch.linalg.inv(N).trace()) / r * (m - r) / m,
                B=floor_factor * float(torch.linalg.inv(M).trace()) / r * (n - r) / n)


def moment_diagnostics(opt, pairs, floor_factor: float | None, floor_mode: str = "scalar") -> dict:
    """Second moments from the optimizer state (read only) in units of noise_std^2, per module kind.

    PRISM: eigenvalues of the bias-corrected r x r moments V_A, V_B (keys exp_avg_sq_A/B) and the
    fraction below the floor f (one-sided only: the two-sided moment is of a row-normalised direction,
    unitless, and its floor is not in these units); naive/ffa: the bias-corrected per-coordinate moments v of each factor.
    With PRISM's momentum shrinkage, also the factor s of each module's last step (unitless).
    """
    std2 = opt.noise_std ** 2
    if std2 == 0:
        return {}
    beta2 = opt.param_groups[0]["betas"][1]
    out = {}
    for kind in llm_tasks.TARGETS:
        rows = {}
        for pair in (p for p in pairs if _module_kind(p.name) == kind):
            state = opt.state.get(pair.lora_B.weight, {})
            if "exp_avg_sq_A" in state and state["exp_avg_sq_A"].shape[-2:] == (pair.shape[2],) * 2:  # PRISM
                floors = _floors(pair, floor_factor, floor_mode)
                for side in ("A", "B"):
                    V = state[f"exp_avg_sq_{side}"] / (1 - beta2 ** state["step"])
                    unit = 1.0 if "exp_avg_sq_rows_A" in state else std2  # two-sided: V is unitless already
                    lam = torch.linalg.eigvalsh((V + V.mT) / 2).div(unit).tolist()
                    rows.setdefault(f"eig_{side}", []).extend(lam)
                    if unit != 1.0:  # the floor is in std^2 units; two-sided eigenvalues are unitless
                        rows.setdefault("below", []).extend(v < floors[side] for v in lam)
                if "momentum_shrinkage" in state:  # PRISM(momentum_shrinkage=True): the step's factor s
                    rows.setdefault("shrinkage", []).append(float(state["momentum_shrinkage"]))
            for label, param in (("A", pair.lora_B.weight), ("B", pair.lora_A.weight)):
                st = opt.state.get(param, {})
                if "exp_avg_sq" in st:  # naive / ffa (dense AdamW state)
                    v = st["exp_avg_sq"] / (1 - beta2 ** st["step"])
                    rows.setdefault(f"v_{label}", []).append(float(v.median()) / std2)
        below = rows.pop("below", None)
        for key, values in rows.items():
            out[f"{kind}.{key}"] = _quantiles(values)
        if below:
            out[f"{kind}.eig_A"]["below_floor"] = sum(below) / len(below)  # both sides
    return out


class StepLog:
    """Per-step diagnostics; prints a progress line every `every` steps."""

    def __init__(self, pairs, steps: int, every: int = 5):
        self.pairs, self.steps, self.every, self.rows, self.start = pairs, steps, every, [], time.time()
        self.z0 = [float(z_matrix(p).norm()) for p in pairs]

    def record(self, loss_sum, examples, clipped, norms, z_before, opt=None, floor_factor=None, floor_mode="scalar"):
        z_after = [z_matrix(p) for p in self.pairs]
        dz = [float((a - b).norm()) for a, b in zip(z_after, z_before)]
        zn = [float(b.norm()) for b in z_before]
        row = dict(step=len(self.rows) + 1, examples=examples, loss=loss_sum / max(examples, 1),
                   clipped_fraction=clipped / examples if examples else None,
                   norm=_quantiles(norms) if norms else None)
        for kind in llm_tasks.TARGETS:
            idx = [i for i, p in enumerate(self.pairs) if _module_kind(p.name) == kind]
            row[f"{kind}.dZ"] = _quantiles([dz[i] for i in idx])
            row[f"{kind}.dZ_over_Z"] = _quantiles([dz[i] / zn[i] for i in idx if zn[i] > 0])
        row["dZ_total"] = math.sqrt(sum(d * d for d in dz))
        row["dZ_over_Z_total"] = row["dZ_total"] / max(math.sqrt(sum(z * z for z in zn)), 1e-30)
        if opt is not None and not isinstance(opt, torch.optim.AdamW):
            row["moments"] = moment_diagnostics(opt, self.pairs, floor_factor, floor_mode)
        self.rows.append(_round(row))
        step = row["step"]
        if self.every and (step % self.every == 0 or step == 1):
            elapsed = time.time() - self.start
            clip = "" if row["clipped_fraction"] is None else f" clipped {row['clipped_fraction']:.2f}"
            med = "" if not row["norm"] else f" norm {row['norm']['median']:.3g}"
            print(f"    step {step}/{self.steps} loss {row['loss']:.4f}{clip}{med} "
                  f"dZ/Z q {row['q_proj.dZ_over_Z'].get('median', float('nan')):.2e} "
                  f"v {row['v_proj.dZ_over_Z'].get('median', float('nan')):.2e} "
                  f"(~{elapsed / step * (self.steps - step):.0f}s left)", flush=True)


def init_summary(pairs) -> dict:
    """Singular values of the initial Z per module kind (PiSSA: W0's top r)."""
    out = {}
    for kind in llm_tasks.TARGETS:
        svs = [torch.linalg.svdvals(z_matrix(p)).tolist() for p in pairs if _module_kind(p.name) == kind]
        if svs and svs[0][0] > 0:
            out[kind] = dict(top=_quantiles([s[0] for s in svs]), rth=_quantiles([s[-1] for s in svs]))
    return out
