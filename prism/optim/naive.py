"""Naive DP-LoRA: DP-SGD / DP-AdamW directly on peft's factors, the baseline PRISM fixes."""

from __future__ import annotations

from ..functional import StepConfig
from ..layers import LoRAPair
from ..pipeline import per_example
from ..pipeline.units import Unit
from . import dense
from .base import DPLoRAOptimizer
from .updates import Update, compute_dtype


class NaiveDPLoRA(DPLoRAOptimizer):
    r"""DP-SGD (adaptive=False) or DP-AdamW (adaptive=True) on lora_A.weight and lora_B.weight.

    Each example's gradient with respect to ALL trainable tensors (both factors of every LoRA
    module and any dense layer) is clipped jointly to norm C, the clipped sum gets
    N(0, (sigma C)^2) on every coordinate, is divided by the expected batch size b, and an
    AdamW or SGD step follows: what Opacus' DPOptimizer wrapping AdamW does on the factors.
    dense_max_grad_norm weighs the dense layers as in PRISM (FFA-LoRA's lora_B counts as LoRA).

    It is gauge-dependent (docs/method.md section 2): under (A, B) -> (c A, B / c) the clipped norm
    ||gA||^2 / c^2 + c^2 ||gB||^2 and the first-order noise energy in Z,
    tau^2 (m ||B||_F^2 + n ||A||_F^2) with tau = sigma C / b, change although Z does not.
    It accepts peft's default init (lora_B = 0), and LoRA layers whose lora_A is frozen: that is
    FFA-LoRA (DP training of lora_B only, each lora_B a bias-free dense layer in the global clip).

    Arguments are those of PRISM without the floor options (the dense AdamW has no floor either);
    the same privacy conditions and accounting apply.
    """

    _frozen_lora_A = True

    def _lora_unit(self, index: int, pair: LoRAPair) -> Unit:
        dtype = compute_dtype(pair.lora_B.weight)

        def factor_grads(x, h, go, grad_scale):
            captured = per_example.in_compute_dtype(dtype, x, h, go, grad_scale=grad_scale)
            return per_example.lora_factor_grads(*captured, pair.lora_B.weight.detach().to(dtype)), None

        return Unit(pair.name, [pair.lora_B.weight, pair.lora_A.weight], factor_grads,
                    per_example.sum_of_squares, dtype)

    def _lora_updates(self, configs: dict[int, StepConfig]) -> list[Update]:
        return [update for unit in self._lora_units
                for update in dense.euclidean_updates(unit, configs, self.state, self.generator)]
