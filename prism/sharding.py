"""Parameters sharded across ranks (FSDP2's `fully_shard`, DTensor): the whole value and this rank's part.

Under FSDP2 a parameter is a DTensor: every rank stores only its part, chunk k of the whole along
each sharded dimension (torch.chunk's cut: parts of ceil(d / W) rows, the last ones shorter or empty).
prism's step needs the whole LoRA factors (QR bases, the r x r algebra, the retraction) and they are
small, so the optimizer keeps each sharded trained tensor whole in its state, gathered once when it is
built; afterwards every rank computes the same new whole value from the same all-reduced sums and
noise, and writes back only its own part. No collective runs in a backward hook (a rank whose share
of a draw is empty runs no backward pass of its own, see `DPLoRAOptimizer.placeholder_pass`).

Supported placements: Shard(d) and Replicate() on any device mesh (FSDP2: one Shard(0); HSDP:
Replicate() then Shard(0)). Others (Partial, strided shards) are refused by name.
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_sharded(param: Tensor) -> bool:
    """Whether `param` is a DTensor (sharded or replicated by torch.distributed.tensor)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(param, DTensor)


def check_placements(param: Tensor, name: str) -> None:
    """Raise unless every placement of `param` is Shard(d) or Replicate()."""
    from torch.distributed.tensor import Replicate, Shard

    for placement in param.placements:
        if type(placement) not in (Shard, Replicate):
            raise NotImplementedError(
                f"{name} is a DTensor placed as {param.placements}; prism supports Shard(dim) and Replicate() "
                "placements (FSDP2's fully_shard, HSDP), not partial sums or strided shards.")


def gather_whole(param: Tensor) -> Tensor:
    """The whole value of a DTensor parameter as a plain tensor on this rank (a collective: every
    rank of the parameter's mesh must call it, in the same order)."""
    return param.detach().full_tensor()


def local_part(param: Tensor, whole: Tensor) -> Tensor:
    """The part of `whole` (a plain tensor of param's global shape) that this rank stores of `param`.

    Raises:
        RuntimeError: the part does not have the shape of the rank's local tensor (a placement
            prism does not know how to cut).
    """
    from torch.distributed.tensor import Shard

    part = whole
    coordinates = param.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            chunks = torch.chunk(part, param.device_mesh.size(mesh_dim), placement.dim)
            k = coordinates[mesh_dim]
            part = chunks[k] if k < len(chunks) else part.narrow(placement.dim, 0, 0)
    local = param.to_local()
    if part.shape != local.shape:
        raise RuntimeError(f"the local part of a DTensor of shape {tuple(param.shape)} placed as {param.placements} "
                           f"has shape {tuple(local.shape)}, not {tuple(part.shape)} (torch.chunk's cut); prism "
                           "cannot write it back.")
    return part


def write_local_part(param: Tensor, whole: Tensor) -> None:
    """Copy this rank's part of `whole` into the DTensor `param`'s local tensor (no communication)."""
    with torch.no_grad():
        param.to_local().copy_(local_part(param, whole).to(param.dtype))


def holds_local_part(param: Tensor, whole: Tensor) -> bool:
    """Whether `param`'s local tensor is exactly this rank's part of `whole` rounded to param's dtype."""
    return torch.equal(param.to_local().detach(), local_part(param, whole).to(param.dtype))


def shard_model(model, **fsdp_options):
    """FSDP2's standard recipe in one call: `fully_shard` on every transformer block of a Hugging Face model
    (the classes its `_no_split_modules` names, e.g. LlamaDecoderLayer), then on the root. Extra options
    (mp_policy, reshard_after_forward, ignored_params, mesh, ...) go to every fully_shard call. Build the
    prism optimizer afterwards. Returns the model.

    Raises:
        ValueError: the model names no block classes, or none of its modules is one.
    """
    from torch.distributed.fsdp import fully_shard

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(inner).__name__} names no transformer block classes (_no_split_modules = "
                         f"{sorted(names)}) found in the model; call torch.distributed.fsdp.fully_shard on its "
                         "blocks yourself, then on the root, then build the optimizer.")
    for block in blocks:
        fully_shard(block, **fsdp_options)
    fully_shard(model, **fsdp_options)
    return model
