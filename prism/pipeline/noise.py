"""Gaussian noise for the privatised gradient, drawn from an explicit generator.

The tangent noise equals std * P_Z(Xi) with Xi ~ N(0, I_{m x n}), sampled in O((m + n) r^2)
from r(m + n) + r^2 normals instead of m n. Its expected energy is
E ||noise||_F^2 = std^2 r (m + n - r), whatever the factors (noise_energy()).

Where the randomness comes from (the optimizers' `generator` argument):
- default: a torch.Generator whose whole state is drawn from os.urandom once
  (entropy_seeded_generator). checkpoints save its state, so a resumed run is bit-for-bit the
  uninterrupted one, and whoever holds a checkpoint can replay all later noise.
- "secure": the whole state is refilled from os.urandom (the OS CSPRNG) before every step's noise
  and never saved. What this protects against: guessing the seed (CPU generators are MT19937 and
  `manual_seed` keeps 32 bits, so a seeded stream is one of 2^32, few enough for an adversary who
  knows the other examples to try against the released model); replaying the noise from a
  leaked checkpoint; carrying knowledge of one step's stream (e.g. MT19937's state, which 624
  consecutive outputs reveal) over to any other step. What it does NOT protect against: within a
  step the stream is still MT19937 (CPU) or Philox (CUDA), not a cryptographic generator;
  floating-point attacks: torch.randn's float32 Gaussians take values on an irregular grid, and,
  as Mironov (CCS 2012) showed for the textbook Laplace sampler, the low-order bits of a released
  noisy value can then depend on the value before noise. prism releases only the result of further
  float arithmetic (division, moments, retraction), which is not known to remove this; no snapping
  or discrete Gaussian sampler is implemented. Nor timing side channels or a compromised host.
  The price: a resumed run draws fresh noise (same distribution, same privacy, not bit-for-bit
  the uninterrupted run). Seeded torch.Generators stay available for reproducible tests.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .._torch_compat import refill_cpu_generator
from ..manifold import TangentBasis, horizontal_lift


def entropy_seeded_generator(device="cpu") -> torch.Generator:
    """A generator whose whole state comes from the operating system's entropy source (see
    fill_from_os_entropy): nobody can predict its stream unless they obtain its state, e.g. from
    a checkpoint."""
    return fill_from_os_entropy(torch.Generator(device=device))


def fill_from_os_entropy(generator: torch.Generator) -> torch.Generator:
    """Replace the generator's whole state by fresh bytes from os.urandom (a CSPRNG); returns it.

    CPU generators are MT19937, and `manual_seed` keeps only 32 bits of any seed (2^32 candidate
    streams, few enough to try them all). Here all 624 state words (19,968 bits) are drawn
    instead. Other devices use Philox, whose key is the full 64-bit seed: it gets 64 fresh bits.
    The stream is still not cryptographic: whoever learns enough of its outputs or its state can
    predict the rest until the next refill.

    Raises:
        RuntimeError: torch's CPU generator state does not have the layout this relies on.
    """
    if generator.device.type != "cpu":
        generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
        return generator
    return refill_cpu_generator(generator, os.urandom)


def gaussian(shape, std: float, generator: torch.Generator, like: Tensor) -> Tensor:
    """std * N(0, I) of `shape`, drawn on the generator's device, returned on like's device/dtype."""
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return (std * z).to(like.device)


def tangent_noise(basis: TangentBasis, std: float, generator: torch.Generator
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Blocks (S, U, V) of std * P_Z(Xi):  S ~ std N(0, I_{r x r}),
    U = std (I - P_A) N(0, I_{m x r}),  V = std (I - P_B) N(0, I_{n x r}).
    For a stack of bases (Q_A (k, m, r), ...), independent noise for each of the k modules."""
    Q_A, Q_B = basis.Q_A, basis.Q_B
    r = Q_A.shape[-1]
    S = gaussian(tuple(Q_A.shape[:-2]) + (r, r), std, generator, Q_A)
    U = gaussian(tuple(Q_A.shape), std, generator, Q_A)
    V = gaussian(tuple(Q_B.shape), std, generator, Q_B)
    return S, U - Q_A @ (Q_A.mT @ U), V - Q_B @ (Q_B.mT @ V)


def horizontal_noise(A: Tensor, B: Tensor, std: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """std N(0, I) on the factors (A (m, r), B (n, r)), projected onto the horizontal space
    {(dA, dB): A^T dA = dB^T B} (the factor directions that move Z, orthogonal to the gauge orbit).

    The noise of PRISM's "balanced" metric: isotropic in the horizontal space, whose dimension is
    r (m + n - r), so its expected energy in the factors is noise_energy(std, m, n, r) as well.
    For stacks (A (k, m, r), ...), independent noise for each module.
    """
    nA, nB = gaussian(tuple(A.shape), std, generator, A), gaussian(tuple(B.shape), std, generator, B)
    return horizontal_lift(A, B, nA, nB)


def noise_energy(std: float, m: int, n: int, r: int) -> float:
    """Closed form E ||std P_Z(Xi)||_F^2 = std^2 r (m + n - r): the tangent space's dimension (also the
    energy of horizontal_noise, measured in the factors)."""
    return std ** 2 * r * (m + n - r)
