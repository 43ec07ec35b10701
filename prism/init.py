"""Full-rank LoRA factors for PRISM (docs/method.md section 4).

The tangent space of M_r is undefined at Z = 0, and peft's default init has lora_B = 0.
Use a full-rank init: `init_lora_weights="pissa"` or `"olora"` in LoraConfig (the top-r part of
W0 moves into the adapter, the model output is unchanged), or `init_balanced_lora(model)`.
Both use public weights only and cost no privacy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .export import MUTATED_BASE_FLAG
from .layers import LoRAPair, find_trainables

RANK_TOLERANCE = 1e-6

FULL_RANK_FIX = ('use init_lora_weights="pissa" (or "olora") in LoraConfig, or call '
                 "prism.init_balanced_lora(model) before building the optimizer")


def check_rank_fits(pair: LoRAPair) -> None:
    """Raise a ValueError if r > min(m, n): no rank-r matrix of that shape exists."""
    m, n, r = pair.shape
    if r > min(m, n):
        raise ValueError(f"{pair.name}: rank r={r} exceeds min(out_features, in_features)={min(m, n)}; "
                         "choose r <= min(m, n) in LoraConfig.")


def check_full_rank(pair: LoRAPair, A: Tensor, B: Tensor) -> None:
    """Raise a ValueError naming the fix if A or B is zero or numerically rank-deficient."""
    check_rank_fits(pair)
    r = pair.shape[2]
    for label, factor in (("lora_B (A)", A), ("lora_A^T (B)", B)):
        sv = torch.linalg.svdvals(factor)
        if not bool(torch.isfinite(sv).all()) or sv[0] == 0 or sv[-1] <= RANK_TOLERANCE * sv[0]:
            raise ValueError(
                f"{pair.name}: the LoRA factor {label} is zero or rank-deficient (singular values "
                f"{sv.min().item():.3g}..{sv.max().item():.3g}); PRISM needs rank-{r} factors "
                f"(peft's default init sets lora_B = 0). Fix: {FULL_RANK_FIX}.")


@torch.no_grad()
def init_balanced_lora(model: nn.Module, scale: float = 3 ** -0.5, *, compensate_base: bool = True,
                       generator: torch.Generator | None = None) -> None:
    """Set every trainable LoRA pair to A = c Q_1, B = c Q_2 with random orthonormal Q_1 (m, r), Q_2 (n, r).

    The default c = 1/sqrt(3) gives the factors the singular values of peft's default lora_A.
    With `compensate_base`, the base weight absorbs -scaling * A B^T so the model's output is
    unchanged (as PiSSA/OLoRA do); the saved adapter is then relative to the modified base:
    export it with prism.export.save_adapter_for_base.
    Only public randomness is used: no privacy cost.
    """
    pairs, _ = find_trainables(model)
    for pair in pairs:
        check_rank_fits(pair)
        base_weight = pair.layer.get_base_layer().weight
        if compensate_base and not (pair.base_kind.may_rewrite_base and base_weight.is_floating_point()):
            raise ValueError(f"{pair.name}: cannot compensate a {pair.base_kind.name} base weight in place; pass "
                             "compensate_base=False.")
    for pair in pairs:
        m, n, r = pair.shape
        weight = pair.lora_B.weight
        Q_1 = torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=torch.float64))[0]
        Q_2 = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))[0]
        A, B = scale * Q_1, scale * Q_2
        if compensate_base:
            _subtract_from_base(pair, pair.scaling * (A @ B.T))
        weight.copy_(A.to(weight.dtype))
        pair.lora_A.weight.copy_(B.T.to(pair.lora_A.weight.dtype))
    if compensate_base:
        setattr(model, MUTATED_BASE_FLAG, True)


def _subtract_from_base(pair: LoRAPair, delta: Tensor) -> None:
    """W0 -= delta, delta (out, in), in the orientation the base layer stores its weight."""
    base = pair.layer.get_base_layer().weight
    base.sub_(pair.base_kind.weight_delta(delta).to(device=base.device, dtype=base.dtype))
