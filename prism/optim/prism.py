"""PRISM: gauge-invariant tangent-space DP-LoRA as a torch.optim.Optimizer (docs/method.md)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate, kernels
from ..functional import StepConfig, prism_module_step
from ..init import check_full_rank
from ..layers import LoRAPair
from ..manifold import TangentBasis, tangent_basis
from ..pipeline import per_example
from ..pipeline.retract import balance, procrustes_align
from ..pipeline.units import Unit
from .base import DPLoRAOptimizer
from .updates import Update, compute_dtype, write


class PRISM(DPLoRAOptimizer):
    r"""Differentially private LoRA fine-tuning in the tangent space of the rank-r manifold.

    For every LoRA module Z = A B^T (A = lora_B.weight, B = lora_A.weight^T; peft's scaling s
    is not part of Z) and a logical batch of expected size b:

    .. math::
        \begin{aligned}
        &\xi_i = P_Z(G_i),\quad G_i = \partial L_i / \partial Z, \quad
            P_Z(G) = G - (I - P_A) G (I - P_B) \\
        &\alpha_i = \min\bigl(1, C / \sqrt{\textstyle\sum_{\text{modules}} \|\xi_i\|_F^2
            + (C / C_D)^2 \|g_i^{\text{dense}}\|^2}\bigr) \\
        &\xi_{dp} = \tfrac{1}{b} \textstyle\sum_i \alpha_i \xi_i + \tfrac{\sigma C}{b} P_Z(\Xi),
            \quad \Xi \sim N(0, I_{m \times n}) \\
        &(dA, dB) = \text{horizontal lift of } \xi_{dp}; \text{ if adaptive: }
            u = \hat m\, \mathrm{floor}(\hat V)^{-1/2} \text{ per side, lifted again} \\
        &Z_{+} = \text{best rank-}r \text{ approximation of } Z - \eta (u_A B^T + A u_B^T)
        \end{aligned}

    With metric="balanced" the first three lines become, at the balanced factors (A^T A = B^T B):
    g_i = (G_i B, G_i^T A), clipped in ||g_i||, and (dA, dB) = (1/b) sum_i alpha_i g_i plus
    (sigma C / b) times isotropic noise on the horizontal factor directions.

    Dense trainable nn.Linear layers (e.g. a classification head) join the same global clip; they
    are updated by AdamW with the same DP-aware second-moment floor (adaptive) or by SGD. By
    default (C_D = C) they count like the LoRA modules and get the same noise std. With
    dense_max_grad_norm = C_D the joint clip weighs the two parts,

        ||g_i||_w^2 = ||P_Z(G_i)||^2 (all LoRA modules) + (C / C_D)^2 ||g_i,dense||^2 <= C^2,

    and the dense tensors get noise std sigma C_D / b: one Gaussian mechanism of sensitivity C and
    multiplier sigma in the coordinates (lora, (C / C_D) dense), so the privacy is unchanged. A
    classifier head whose per-example gradients are ten times the LoRA part's would otherwise take
    most of C, and the noise would drown the LoRA signal; C_D near the head's typical norm and C
    near the LoRA part's give each part a similar share. Choose them from public data or a
    public model: a choice made from measurements on the private data is not accounted for.

    Every `step()` is recorded by `optimizer.accountant` (also an empty batch's);
    `optimizer.privacy_spent()` gives (epsilon, delta) and `get_epsilon()` the
    (lower, estimate, upper) triple.

    Formal guarantees: every example's clipped contribution has norm <= max_grad_norm over all
    trained tensors together (in the weighted norm above), and the noise is std * P_Z(Xi) per
    module with std = noise_multiplier * max_grad_norm / expected_batch_size (dense tensors:
    N(0, I) times noise_multiplier * dense_max_grad_norm / expected_batch_size). Each step thus
    costs exactly a DP-SGD step with the same (noise_multiplier, sampling rate), PROVIDED that
    (1) each example's loss depends on that example alone, (2) batches are drawn by Poisson
    sampling with rate q = expected_batch_size / N, and (3) the generator is not seeded from data.
    Noise-free trajectories of Z do not depend on how the initial Z is factored.

    Args:
        model: the peft model; hooks are attached to its LoRA layers in place.
        lr (float): learning rate eta.
        max_grad_norm (float): clipping bound C > 0 on each example's global tangent norm.
        dense_max_grad_norm (float, optional): C_D > 0, the dense layers' scale in the joint clip
            (default: C, a plain joint clip).
        noise_multiplier (float, optional): sigma >= 0; 0 means clipping only (no privacy).
        target_epsilon (float, optional): instead of noise_multiplier: the smallest sigma whose
            upper epsilon after `steps` (or `epochs`) is <= target_epsilon at `delta`.
        expected_batch_size (float, optional): b = q N, the EXPECTED logical batch size (never the
            realised one). Required unless sample_rate and dataset_size are given.
        sample_rate (float, optional): the Poisson rate q; or dataset_size (int, optional): N, with
            q = expected_batch_size / N. Without either the optimizer cannot account.
        delta (float, optional): delta for accounting (must be < 1/N when N is known).
        steps / epochs (optional): the planned length, for target_epsilon.
        max_epsilon (float, optional): raise PrivacyBudgetExceeded before a step that would exceed it.
        allow_non_poisson (bool, optional): accept accounting for batches that are visibly not
            Poisson-sampled (the epsilon is then not a guarantee; a warning says so) (default: False).
        adaptive (bool, optional): DP-aware adaptive update (default: True); False is Riemannian DP-SGD.
        betas (tuple, optional): moment coefficients (default: (0.9, 0.999)).
        eps (float, optional): added to the preconditioner's square roots (default: 1e-8).
        weight_decay (float, optional): decoupled decay of Z (and dense weights) (default: 0).
        metric (str, optional): the norm examples are clipped in and the noise is isotropic in
            (default: "frobenius"). "frobenius": ||P_Z(G_i)||_F, the tangent space's own norm (the
            paper's). "balanced": ||G_i B||^2 + ||G_i^T A||^2 at the balanced factors of Z
            (A^T A = B^T B, a function of Z, so still gauge invariant), with the noise isotropic in
            the horizontal factor directions; the update follows the factor gradient, whose step in
            Z weights each singular direction by its singular value (docs/method.md 3.7).
        preconditioner (str, optional): "two_sided" (default): r x r second moments per factor and a
            second moment per row of each factor (its features), which damps rows whose gradients
            dominate the others', as a language model's outlier features do (method 3.5); "one_sided":
            the r x r moments alone (the paper's). Gauge invariant either way.
        floor_mode (str, optional): "scalar" or "geometry" noise floor of the second moments (default: "scalar";
            "geometry" is for the Frobenius metric only).
        floor_factor (float, optional): f in the floor f * std^2, with the dense layers' own std
            for them (default: 0.5).
        max_condition (float, optional): condition-number clamp of the second moments (default: 1e4).
        momentum_shrinkage (bool, optional): multiply each module's adaptive step by
            s = max(0, 1 - c_t E / ||m_hat||^2), the share of its first moment's energy that is not the
            injected noise (E: the closed-form noise energy of a step, c_t: its share in the moment), so that
            steps shrink once the gradients sink into the noise (method 3.5). Post-processing: no privacy
            cost. The last s of each module is in its state under "momentum_shrinkage" (default: False; on
            SmolLM2 it cost 2 points of accuracy, method 3.5 says why).
        loss_reduction (str, optional): "mean" if the loss is the mean of per-example losses over
            the micro-batch, "sum" if it is their sum (default: "mean").
        generator (torch.Generator or "secure", optional): source of all noise, on the parameters'
            device (default: a generator whose state is drawn from os.urandom once). "secure" refills
            the whole state from os.urandom before every step and never saves it (see pipeline/noise.py).

    Raises:
        ValueError: bad hyperparameters, no LoRA layer, several active adapters, trainable
            parameters prism cannot train privately, or zero/rank-deficient factors.

    Reference: Wang & Zhang, "PRISM: Gauge-Invariant Tangent-Space Differentially Private LoRA",
    ICML 2026.
    """

    def __init__(self, model: nn.Module, *, metric: str = "frobenius", preconditioner: str = "two_sided",
                 floor_mode: str = "scalar", floor_factor: float = 0.5, max_condition: float = 1e4,
                 momentum_shrinkage: bool = False, **kwargs):
        _validate.one_of({"frobenius", "balanced"}, metric=metric)
        _validate.one_of({"one_sided", "two_sided"}, preconditioner=preconditioner)
        _validate.one_of({"scalar", "geometry"}, floor_mode=floor_mode)
        if metric == "balanced" and floor_mode == "geometry":
            raise ValueError("floor_mode='geometry' corrects for the Frobenius metric's noise, which is not isotropic "
                             "in the factors; with metric='balanced' it is, so the scalar floor is already in its "
                             "units: use floor_mode='scalar'.")
        _validate.non_negative(floor_factor=floor_factor)
        _validate.positive(max_condition=max_condition)
        if momentum_shrinkage and not kwargs.get("adaptive", True):
            raise ValueError("momentum_shrinkage scales the adaptive step's first moment; with adaptive=False there "
                             "is none: drop momentum_shrinkage or set adaptive=True.")
        # per shape group, for the current logical step: the stacked factors (A, B) and their basis
        self._points: dict[tuple[int, ...], tuple[Tensor, Tensor, TangentBasis]] = {}
        super().__init__(model, metric=metric, preconditioner=preconditioner, floor_mode=floor_mode,
                         floor_factor=floor_factor, max_condition=max_condition,
                         momentum_shrinkage=momentum_shrinkage, **kwargs)
        self._groups = self._shape_groups()
        # index -> (its group, its place in the group)
        self._positions = {index: (group, position) for group in self._groups for position, index in enumerate(group)}

    def _lora_unit(self, index: int, pair: LoRAPair) -> Unit:
        """Check rank, re-factor to balanced form (Z unchanged) and hook the tangent blocks.

        The balanced factors are rotated as close as possible to the given ones, so factors that
        are already balanced (e.g. when resuming) stay as they are.
        """
        dtype = compute_dtype(pair.lora_B.weight)
        A, B = self.value_of(pair.lora_B.weight, dtype), self.value_of(pair.lora_A.weight, dtype).T
        check_full_rank(pair, A, B)
        with torch.no_grad():
            A_bal, B_bal = procrustes_align(*balance(A, B), A, B)
            write(pair.lora_B.weight, A_bal, self.state)
            write(pair.lora_A.weight, B_bal.T, self.state)

        balanced = self.defaults["metric"] == "balanced"

        def blocks(x, h, go, grad_scale):
            Y, W, sqnorms = kernels.tangent_blocks(x, h, go, self._basis(index), grad_scale)
            return (Y, W), None if balanced else sqnorms

        def sqnorms(Y, W):
            basis = self._basis(index)
            return per_example.balanced_sqnorms(Y, W, basis) if balanced else per_example.tangent_sqnorms(Y, W, basis)

        params = [pair.lora_A.weight, pair.lora_B.weight]
        return Unit(pair.name, params, blocks, sqnorms, dtype, sum_shapes=[tuple(A.shape), tuple(B.shape)])

    def _basis(self, index: int) -> TangentBasis:
        """The tangent basis at the current Z, fixed for the whole logical step (computed for the
        module's whole shape group at once)."""
        group, position = self._positions[index]
        return TangentBasis(*(t[position] for t in self._group_point(group)[2]))

    def _group_point(self, group: tuple[int, ...]) -> tuple[Tensor, Tensor, TangentBasis]:
        """A (k, m, r), B (k, n, r) of a group's modules, stacked, and their tangent basis; fixed for the
        logical step (the factors change only when the step is applied)."""
        if group not in self._points:
            factors = [self._factors(index) for index in group]
            A, B = torch.stack([A for A, _ in factors]), torch.stack([B for _, B in factors])
            self._points[group] = (A, B, tangent_basis(A, B))
        return self._points[group]

    def _shape_groups(self) -> list[tuple[int, ...]]:
        """Indices of the LoRA modules, grouped by (shapes, dtype, device, parameter group): each
        group's manifold math runs as one batched call (on a GPU, a few large launches instead of
        many small ones)."""
        param_group = {id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]}
        groups: dict[tuple, list[int]] = {}
        for index, unit in enumerate(self._lora_units):
            A, B = self._factors(index)
            key = (A.shape, B.shape, unit.compute_dtype, A.device, param_group[id(unit.params[0])])
            groups.setdefault(key, []).append(index)
        return [tuple(indices) for indices in groups.values()]

    def _factors(self, index: int) -> tuple[Tensor, Tensor]:
        """(A, B) = (lora_B.weight, lora_A.weight^T) in the compute dtype (fp32 masters for bf16)."""
        pair, dtype = self.pairs[index], self._lora_units[index].compute_dtype
        return self.value_of(pair.lora_B.weight, dtype), self.value_of(pair.lora_A.weight, dtype).T

    def _settings(self) -> dict:
        return dict(super()._settings(), metric=self.defaults["metric"])

    def _extra_config(self, group: dict) -> dict:
        keys = ("metric", "preconditioner", "floor_mode", "floor_factor", "max_condition", "momentum_shrinkage")
        return {key: group[key] for key in keys}

    def _lora_updates(self, configs: dict[int, StepConfig]) -> list[Update]:
        updates = []
        for group in self._groups:
            A, B, basis = self._group_point(group)
            cfg = configs[id(self.pairs[group[0]].lora_B.weight)]
            sums = [self._lora_units[index].sums_or_zeros() for index in group]
            Y_sum, W_sum = torch.stack([Y for Y, _ in sums]), torch.stack([W for _, W in sums])
            states = [self.state[self.pairs[index].lora_B.weight] for index in group]
            state = _stacked_moments(states)
            names = ", ".join(self.pairs[index].name for index in group)
            try:
                A_new, B_new = prism_module_step(A, B, Y_sum, W_sum, basis, state, cfg, self.generator)
            except (FloatingPointError, torch.linalg.LinAlgError) as exc:
                raise FloatingPointError(f"the update of {names} is not finite ({exc}); the step was not "
                                         "applied. Lower the learning rate or check the inputs for inf/NaN.") from exc
            _unstack_moments(state, states)
            for position, index in enumerate(group):
                pair = self.pairs[index]
                updates += [Update(pair.lora_B.weight, A_new[position], pair.name),
                            Update(pair.lora_A.weight, B_new[position].T, pair.name)]
        return updates

    def _end_step(self) -> None:
        super()._end_step()
        self._points.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._points.clear()


MOMENTS = ("exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B")
ROW_MOMENTS = ("exp_avg_sq_rows_A", "exp_avg_sq_rows_B")  # preconditioner="two_sided"
SHRINKAGE = "momentum_shrinkage"  # momentum_shrinkage=True: the last step's factor s per module (diagnostics)


def _stacked_moments(states: list[dict]) -> dict:
    """The adaptive state of a group's modules as one state of stacked tensors ({} before the first step)."""
    steps = {state.get("step") for state in states}
    if len(steps) != 1:
        raise RuntimeError(f"the LoRA modules of one shape have different step counts {sorted(map(str, steps))}; "
                           "their optimizer state was not saved or loaded together.")
    step = steps.pop()
    if step is None:
        return {}
    keys = MOMENTS + tuple(key for key in ROW_MOMENTS if key in states[0])
    return dict(step=step, **{key: torch.stack([state[key] for state in states]) for key in keys})


def _unstack_moments(stacked: dict, states: list[dict]) -> None:
    """Write a stacked state back into each module's state (as views of the stacked tensors)."""
    if not stacked:
        return
    for position, state in enumerate(states):
        state["step"] = stacked["step"]
        state.update({key: stacked[key][position] for key in MOMENTS + ROW_MOMENTS + (SHRINKAGE,) if key in stacked})
