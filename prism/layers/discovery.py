"""Find what a peft model trains, and refuse anything that cannot be trained privately.

Every trainable parameter must belong to exactly one of:
- a LoRA pair: lora_A / lora_B (nn.Linear, no bias) of a peft LoRA layer of the single active
  adapter, whose base layer is of a registered kind (layers.registry: nn.Linear, GPT-2's Conv1D);
- a dense nn.Linear whose weight (and bias) are trainable, e.g. a classification head in
  `modules_to_save`;
- only with `frozen_lora_A=True` (FFA-LoRA): the lora_B of a LoRA layer whose lora_A is frozen,
  which is then a bias-free dense nn.Linear (input lora_A's output) trained like a head.
Anything else (a trainable LayerNorm, embedding, DoRA magnitude, lora_bias) raises, naming the
parameter, because its per-example gradient would be missing and it would be trained non-privately.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peft.tuners.lora import LoraLayer as _PeftLoraLayer

from .registry import BaseKind, base_kind_of, supported_kinds


@dataclass(frozen=True)
class LoRAPair:
    """One LoRA module: Z = lora_B.weight @ lora_A.weight (m x n), delta W = scaling * Z."""

    name: str
    layer: nn.Module  # the peft LoRA layer (base layer + adapters)
    lora_A: nn.Linear  # weight (r, n) = B^T
    lora_B: nn.Linear  # weight (m, r) = A
    scaling: float
    base_kind: BaseKind  # what the frozen layer under the adapter is (layers.registry)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(m, n, r)."""
        return self.lora_B.out_features, self.lora_A.in_features, self.lora_A.out_features


@dataclass(frozen=True)
class DenseLinear:
    """An nn.Linear trained with Euclidean per-example gradients (weight, and bias if trainable)."""

    name: str
    module: nn.Linear
    lora_factor: bool = False  # FFA-LoRA's lora_B: clipped and noised like the LoRA modules, not the dense layers


def find_trainables(model: nn.Module, *, frozen_lora_A: bool = False
                    ) -> tuple[list[LoRAPair], list[DenseLinear]]:
    """LoRA pairs and dense linears covering every trainable parameter of `model`.

    Args:
        frozen_lora_A: accept LoRA layers whose lora_A is frozen (FFA-LoRA); their lora_B is
            returned as a DenseLinear (default: False, such layers raise).

    Raises:
        ValueError: no LoRA layer, several active adapters, an unsupported LoRA variant, a
            frozen lora_A without `frozen_lora_A`, or a trainable parameter that is neither a
            LoRA factor nor part of a dense nn.Linear.
    """
    _refuse_shared_trainables(model)
    pairs, frozen_A = _find_lora_pairs(model, frozen_lora_A)
    covered = {id(p) for pair in pairs for p in (pair.lora_A.weight, pair.lora_B.weight)}
    dense = [DenseLinear(f"{pair.name}.lora_B", pair.lora_B, lora_factor=True) for pair in frozen_A]
    covered.update(id(pair.lora_B.weight) for pair in frozen_A)
    unsupported = []
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad and id(p) not in covered]
        if not own:
            continue
        if type(module) is nn.Linear and not _is_lora_factor(name):
            dense.append(DenseLinear(name, module))
            covered.update(id(p) for _, p in own)
        else:
            unsupported += [f"{name}.{n} ({type(module).__name__})" for n, p in own]
    if unsupported:
        raise ValueError(
            "these trainable parameters have no private per-example gradient in prism: "
            + ", ".join(unsupported)
            + ". Freeze them (param.requires_grad_(False)) or train them as LoRA targets; prism trains "
            "LoRA factors and dense nn.Linear layers (e.g. a head in modules_to_save) privately.")
    return pairs, dense


def _refuse_shared_trainables(model: nn.Module) -> None:
    """A trainable parameter registered in two modules (tied weights) gets its gradient from both;
    hooks on one of them would miss the other's share."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(f"{name}.{param_name}")
    shared = [" and ".join(names) for names in owners.values() if len(names) > 1]
    if shared:
        raise ValueError("trainable parameters shared by several modules (tied weights): " + "; ".join(shared)
                         + ". prism would see only one module's share of their gradient. Freeze or untie them.")


def _find_lora_pairs(model: nn.Module, frozen_lora_A: bool) -> tuple[list[LoRAPair], list[LoRAPair]]:
    """(pairs with both factors trainable, pairs with only lora_B trainable)."""
    pairs, frozen_A, active = [], [], set()
    for name, layer in model.named_modules():
        if not isinstance(layer, _PeftLoraLayer):
            continue
        adapters = [a for a in layer.active_adapters if a in layer.lora_A or a in layer.lora_embedding_A]
        active.update(adapters)
        for adapter in adapters:
            pair = _lora_pair(f"{name}[{adapter}]", layer, adapter)
            if pair is None:
                continue
            if not pair.lora_A.weight.requires_grad:
                if not frozen_lora_A:
                    raise ValueError(f"{pair.name}: lora_A and lora_B must both be trainable (this optimizer "
                                     "does not support freezing one factor; NaiveDPLoRA trains FFA-LoRA).")
                frozen_A.append(pair)
            else:
                pairs.append(pair)
    if not pairs and not frozen_A:
        raise ValueError(
            "the model has no active, trainable peft LoRA layer: wrap it with peft.get_peft_model(model, "
            "LoraConfig(target_modules=[...])) before building a prism optimizer.")
    if len(active) > 1:
        raise ValueError(
            f"several LoRA adapters are active ({sorted(active)}); prism trains exactly one: call "
            "model.set_adapter(name) first.")
    return pairs, frozen_A


def _lora_pair(name: str, layer, adapter: str) -> LoRAPair | None:
    """The pair of `adapter` in `layer`; None when both factors are frozen."""
    base = layer.get_base_layer()
    kind = base_kind_of(base)
    if kind is None or adapter not in layer.lora_A:
        raise ValueError(f"{name}: LoRA on {type(base).__name__} layers is not supported; target modules of a "
                         f"supported kind ({', '.join(supported_kinds())}).")
    if adapter in getattr(layer, "lora_variant", {}):
        variant = type(layer.lora_variant[adapter]).__name__
        raise ValueError(f"{name}: the LoRA variant {variant} (e.g. DoRA) is not supported; set "
                         "use_dora=False in LoraConfig.")
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear:
        raise ValueError(f"{name}: lora_A/lora_B must be nn.Linear, got {type(lora_A).__name__}.")
    if lora_A.bias is not None or lora_B.bias is not None:
        raise ValueError(f"{name}: lora_bias=True is not supported; set lora_bias=False in LoraConfig.")
    if not (lora_A.weight.requires_grad or lora_B.weight.requires_grad):
        return None
    if not lora_B.weight.requires_grad:
        raise ValueError(f"{name}: lora_B is frozen but lora_A is trained; freeze neither (or freeze lora_A: "
                         "FFA-LoRA, with NaiveDPLoRA).")
    return LoRAPair(name, layer, lora_A, lora_B, float(layer.scaling[adapter]), kind)


def _is_lora_factor(module_name: str) -> bool:
    parts = module_name.split(".")
    return any(p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") for p in parts)
