"""Gaussian noise for the privatised gradient, drawn from an explicit generator.

The tangent noise equals std * P_Z(Xi) with Xi ~ N(0, I_{m x n}), sampled in O((m + n) r^2)
from r(m + n) + r^2 normals instead of m n. Its expected energy is
E ||noise||_F^2 = std^2 r (m + n - r), whatever the factors (noise_energy()).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .manifold import TangentBasis


def entropy_seeded_generator(device="cpu") -> torch.Generator:
    """A generator seeded from the operating system's entropy source: nobody can predict its stream
    (unless they obtain its state, e.g. from a checkpoint)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") & (2 ** 63 - 1))
    return generator


def gaussian(shape, std: float, generator: torch.Generator, like: Tensor) -> Tensor:
    """std * N(0, I) of `shape`, drawn on the generator's device, returned on like's device/dtype."""
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return (std * z).to(like.device)


def tangent_noise(basis: TangentBasis, std: float, generator: torch.Generator
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Blocks (S, U, V) of std * P_Z(Xi):  S ~ std N(0, I_{r x r}),
    U = std (I - P_A) N(0, I_{m x r}),  V = std (I - P_B) N(0, I_{n x r})."""
    Q_A, Q_B = basis.Q_A, basis.Q_B
    r = Q_A.shape[1]
    S = gaussian((r, r), std, generator, Q_A)
    U = gaussian(tuple(Q_A.shape), std, generator, Q_A)
    V = gaussian(tuple(Q_B.shape), std, generator, Q_B)
    return S, U - Q_A @ (Q_A.T @ U), V - Q_B @ (Q_B.T @ V)


def noise_energy(std: float, m: int, n: int, r: int) -> float:
    """Closed form E ||std P_Z(Xi)||_F^2 = std^2 r (m + n - r): the tangent space's dimension."""
    return std ** 2 * r * (m + n - r)
