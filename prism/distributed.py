"""Data-parallel training over torch.distributed: a replicated adapter, clipped sums summed over ranks.

Every one of the W processes (ranks) holds the whole model and an identical prism optimizer.
For each logical step:

- the Poisson draw D (every example independently with probability q) is made once, from
  randomness every rank shares (rank 0's generator state or seed, broadcast when the sampler is
  built), and cut by position into W disjoint shares D_0, ..., D_{W-1} (sampling.split_evenly):
  every drawn example is used by exactly one rank;
- rank k clips its own examples as usual; at `step()` the clipped sums of every module and the
  example counts are summed over ranks (all_reduce, SUM):
  sum_k sum_{i in D_k} alpha_i g_i = sum_{i in D} alpha_i g_i;
- the noise std N(0, I) is drawn once per step from generators in the same state on every rank
  (rank 0's state, broadcast when the optimizer is built; with generator="secure", rank 0 refills
  it from os.urandom and broadcasts it every step), so all ranks add the same noise;
- every rank computes the same update from the same numbers: the replicas stay identical, which
  every step verifies (`Replicas.check_identical`, bit patterns of the trainable parameters and
  the generator state compared across ranks).

Formal guarantees: the parameters every rank holds after a step are those of one process taking
the same step on the global batch D (up to the summation order of floating-point sums): the same
sensitivity C, the same noise std = sigma C / b (dense layers: sigma C_D / b) with b = q N the
GLOBAL expected batch size, and the same global rate q the accountant composes. What travels between ranks (clipped sums before
noise, counts, generator states) stays inside the training job, as gradients do in any DDP run.

A model wrapped in torch's DistributedDataParallel must not be used: its reducer all-reduces the
non-private gradients and expects every rank to run the same number of backward passes, which
Poisson shares (possibly empty) do not. prism does the reduction itself.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .sharding import is_sharded

_BITS = {1: torch.int8, 2: torch.int16}  # other element sizes are read as int32 words


def world() -> tuple[int, int]:
    """(number of ranks, this rank); (1, 0) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (`obj` itself without torch.distributed)."""
    if world()[0] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_every_rank(flag: bool) -> bool:
    """Whether `flag` is true on every rank (`flag` itself without torch.distributed)."""
    if world()[0] == 1:
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_generator(generator: torch.Generator) -> torch.Generator:
    """Give `generator` rank 0's state on every rank; returns it."""
    if world()[0] > 1:
        generator.set_state(broadcast_object(generator.get_state()))
    return generator


def check_same_world(ranks: int, what: str) -> None:
    """Raise if the number of ranks differs from `ranks`, the number when `what` was built."""
    now = world()[0]
    if now != ranks:
        raise RuntimeError(
            f"{what} was built with {ranks} process(es) but torch.distributed now has {now}; every rank must "
            "draw and reduce together. Build it after torch.distributed.init_process_group (with the Trainer: "
            "after creating TrainingArguments, which starts it under torchrun).")


def fingerprint(tensors: Iterable[Tensor]) -> Tensor:
    """(k,) int64, per tensor the sum of its bit pattern read as integers (mod 2^64).

    Equal tensors give equal values whatever the order of summation, and any change of a single
    element changes the value; a cheap test that replicas hold identical tensors.
    """
    sums = []
    for t in tensors:
        flat = t.detach().contiguous().reshape(-1)
        sums.append(flat.view(_BITS.get(flat.element_size(), torch.int32)).sum(dtype=torch.int64))
    if not sums:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack([s.to(sums[0].device) for s in sums])


def _as_number(value) -> float:
    """A setting as a float: None -> -1, a string -> its CRC-32, a number -> itself."""
    if value is None:
        return -1.0
    if isinstance(value, str):
        return float(zlib.crc32(value.encode()))
    return float(value)


def _collective_device() -> torch.device:
    """Where tensors must be for collectives: the current GPU under NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Replicas:
    """The ranks' copies of one optimizer: what they share when built and reduce at every step.

    Built (on every rank at once) when torch.distributed runs W > 1 processes: gives every rank
    rank 0's trainable parameters and generator state, and checks that the privacy settings and
    all other weights of the model are already identical.

    Raises:
        ValueError: the privacy settings (name -> number or None), or the model's other weights
            (frozen base, buffers), differ between ranks.
    """

    def __init__(self, model: torch.nn.Module, params: Sequence[Tensor], generator: torch.Generator,
                 settings: dict):
        values = torch.tensor([_as_number(v) for v in settings.values()], dtype=torch.float64)
        if not self._identical(values):
            raise ValueError(f"the optimizer's privacy settings differ between ranks (this rank: {settings}); build it "
                             "with the same arguments on every rank, since rank 0's noise must cover every rank's clip.")
        with torch.no_grad():
            for p in params:
                if not is_sharded(p):  # a sharded parameter is one value, whatever each rank loaded
                    self._broadcast(p)
        broadcast_generator(generator)
        replicated = [p for p in model.parameters() if not is_sharded(p)]  # shards differ between ranks by design
        if not self._identical(fingerprint([*replicated, *model.buffers()])):
            raise ValueError("the model's frozen weights or buffers differ between ranks; load the same base model "
                             "on every rank (seed any random initialisation identically, e.g. transformers.set_seed "
                             "before building the model).")

    def _broadcast(self, tensor: Tensor) -> None:
        device = _collective_device()
        buffer = tensor.detach().to(device)
        dist.broadcast(buffer, src=0)
        tensor.copy_(buffer)

    def _extremes(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """Elementwise (max, min) of `values` over ranks (one all_reduce)."""
        both = torch.cat([values, -values]).to(_collective_device())
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        high, low = both.cpu().chunk(2)
        return high, -low

    def _identical(self, values: Tensor) -> bool:
        return torch.equal(*self._extremes(values))

    def sum_over_ranks(self, tensors: Sequence[Tensor]) -> None:
        """Replace every tensor by its sum over ranks, in place (one all_reduce per dtype)."""
        device = _collective_device()
        for dtype in dict.fromkeys(t.dtype for t in tensors):  # the same order on every rank
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1).to(device) for t in group])
            dist.all_reduce(flat)
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(part.view_as(t))

    def check_identical(self, params: Sequence[Tensor], generator: torch.Generator, local_faults: int = 0,
                        fault_message: str = "") -> None:
        """Raise unless every rank holds bit-identical `params` and generator state, and no rank counts
        a local fault (`local_faults` > 0 raises RuntimeError(fault_message) on every rank at once)."""
        values = torch.cat([fingerprint(params).cpu(), fingerprint([generator.get_state()]),
                            torch.tensor([local_faults], dtype=torch.int64)])
        high, low = self._extremes(values)
        if high[-1] > 0:
            raise RuntimeError(fault_message)
        if not torch.equal(high, low):
            raise RuntimeError("the replicas differ between ranks (trainable parameters or noise generator): "
                               "something changed them on some ranks only, e.g. loading a checkpoint or "
                               "writing to the parameters on one rank. Every rank must run the same steps.")
