"""Where a LoRA fine-tune moved the weights, relative to the pretrained weight's principal subspaces.

A diagnostic for the initialisation question of issue 22: PiSSA starts the adapter in the top-r singular
subspaces of each pretrained weight W0 with the large singular values there, and PRISM's steps lie (to first
order) in the tangent space of the rank-r manifold at Z, {U X^T + Y V^T}: every step touches U's column space or
V's row space. This module measures, per LoRA layer, the update Delta W = scaling (B_1 A_1 - B_0 A_0) (the base
is fixed during training; PiSSA and the balanced init compensate it at the start) against W0's top-r singular
vectors U_r, V_r:

    principal share = 1 - ||(I - U_r U_r^T) Delta W (I - V_r V_r^T)||_F^2 / ||Delta W||_F^2,

the part of the update's energy that touches W0's principal column or row space (a random rank-r update of an
m x n matrix has about 1 - (1 - r/m)(1 - r/n)), and the relative size ||Delta W||_F / ||W0||_F. peft's fast
PiSSA (pissa_niter_K, a randomised SVD) starts only near W0's exact top-r subspaces: start_overlap says how near.
"""

from __future__ import annotations

import statistics

import torch
from peft.tuners.lora import LoraLayer
from torch import nn


def _lora_layers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            adapter = module.active_adapters[0]
            yield name, module, module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter]


@torch.no_grad()
def snapshot(model: nn.Module) -> dict:
    """Per LoRA layer: W0's top-r singular vectors (W0 = base + scaling B A now) and the factors, before training."""
    out = {}
    for name, module, A, B, scaling in _lora_layers(model):
        base = module.get_base_layer().weight
        if base.shape != (B.shape[0], A.shape[1]):
            raise ValueError(f"{name}: the base weight {tuple(base.shape)} is not stored (out, in) like nn.Linear's")
        W0 = base.double() + scaling * (B.double() @ A.double())
        U, _, Vh = torch.linalg.svd(W0, full_matrices=False)
        r = A.shape[0]
        out[name] = dict(U=U[:, :r], V=Vh[:r].T, A=A.detach().double().clone(), B=B.detach().double().clone(),
                         norm=W0.norm().item())
    return out


@torch.no_grad()
def update_geometry(model: nn.Module, before: dict) -> dict:
    """Mean over LoRA layers (and per projection name, e.g. q_proj) of the principal share and relative size."""
    rows = {}
    for name, _, A, B, scaling in _lora_layers(model):
        s = before[name]
        delta = scaling * (B.double() @ A.double() - s["B"] @ s["A"])
        energy = delta.square().sum().item()
        if energy == 0.0:
            continue
        outside = delta - s["U"] @ (s["U"].T @ delta)
        outside = outside - (outside @ s["V"]) @ s["V"].T
        rows.setdefault(name.rsplit(".", 1)[-1], []).append(
            (1.0 - outside.square().sum().item() / energy, energy ** 0.5 / s["norm"]))
    everything = [row for group in rows.values() for row in group]
    if not everything:
        return {}
    return dict(all=_mean(everything), **{kind: _mean(group) for kind, group in sorted(rows.items())})


@torch.no_grad()
def start_overlap(before: dict) -> float | None:
    """Mean over LoRA layers of ||Q^T U_r||_F^2 / r, Q an orthonormal basis of the initial lora_B's columns: 1 when
    the adapter starts in W0's exact top-r column space (PiSSA with an exact SVD), about r / m for a random one;
    None when no layer starts with full-rank factors (peft's default, lora_B = 0)."""
    overlaps = []
    for s in before.values():
        B = s["B"]
        if torch.linalg.matrix_rank(B) < B.shape[1]:
            continue
        overlaps.append((torch.linalg.qr(B)[0].T @ s["U"]).square().sum().item() / B.shape[1])
    return statistics.mean(overlaps) if overlaps else None


def _mean(rows: list[tuple[float, float]]) -> dict:
    return dict(principal_share=statistics.mean(x for x, _ in rows),
                relative_update=statistics.mean(y for _, y in rows))
