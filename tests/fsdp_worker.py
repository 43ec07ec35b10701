"""Private training runs on an FSDP2-sharded tiny Llama, shared by tests/test_fsdp.py: run in one process
(unsharded) for the reference, and by `torchrun --nproc_per_node 2 fsdp_worker.py OUT` on 2 CPU processes
(gloo), where each rank saves what it got to OUT/rank<r>.pt.

The sharded runs follow the standard FSDP2 recipe: `fully_shard` on every decoder layer, then on the
root, then the optimizer. A rank whose share of a draw is empty runs a placeholder pass on public
tokens so the ranks' collectives match. Rank 1 gets other sampling and noise seeds on purpose:
rank 0's must win.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import make_batch, per_example_losses, select, tiny_model  # noqa: E402
import prism  # noqa: E402
from prism import NaiveDPLoRA, PRISM, PoissonBatchSampler, distributed  # noqa: E402

N, SAMPLE_RATE, STEPS = 16, 0.25, 4
PLACEHOLDER = make_batch("llama", 2, seed=99)  # public tokens for a rank whose share is empty


def shard(model, lora: bool = True, mixed: bool = False) -> None:
    """FSDP2's standard recipe; lora=False keeps the LoRA factors whole on every rank (ignored_params);
    mixed: bf16 compute with fp32 parameters and fp32 gradient reduction, sharded by prism.shard_model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed:  # through prism's one-line helper
        prism.shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        return
    ignored = None if lora else {p for name, p in model.named_parameters() if "lora_" in name}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)


def whole(model) -> dict:
    """Every trained tensor as a whole plain tensor (gathered from the shards: a collective)."""
    from prism.sharding import gather_whole, is_sharded

    return {name: (gather_whole(p) if is_sharded(p) else p.detach()).clone()
            for name, p in model.named_parameters() if p.requires_grad}


def base_share(model) -> float:
    """The fraction of the frozen base's elements this rank stores."""
    from prism.sharding import is_sharded

    frozen = [p for p in model.parameters() if not p.requires_grad]
    local = sum((p.to_local() if is_sharded(p) else p).numel() for p in frozen)
    return local / sum(p.numel() for p in frozen)


def rank_specific(seed: int) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if distributed.world()[1] == 0 else None


def train(cls=PRISM, sharded: bool = True, lora_sharded: bool = True, noise: float = 1.0, steps: int = STEPS,
          state: dict | None = None, mixed: bool = False) -> dict:
    """`steps` private steps (micro-batches of 2); from `state` (a previous run's result) when given."""
    model = tiny_model("llama", dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state["params"], strict=False)
    if sharded:
        shard(model, lora_sharded, mixed)
    data = make_batch("llama", N, seed=1)
    opt = cls(model, lr=0.05, max_grad_norm=0.5, noise_multiplier=noise, sample_rate=SAMPLE_RATE, dataset_size=N,
              delta=1e-3, loss_reduction="sum", generator=rank_specific(1))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    start = 0 if state is None else state["steps"]
    sampler = PoissonBatchSampler(N, SAMPLE_RATE, steps, seed=7 + distributed.world()[1], micro_batches=2,
                                  start_step=start)
    shares, placeholders = [], 0
    for position, indices in enumerate(sampler):
        shares.append(indices)
        if indices:
            per_example_losses("llama", model, select(data, indices)).sum().backward()
        elif sharded:
            with opt.placeholder_pass():
                per_example_losses("llama", model, PLACEHOLDER).sum().backward()
            placeholders += 1
        if position % 2 == 1:
            opt.step()
            opt.zero_grad()
    return dict(params=whole(model), shares=shares, placeholders=placeholders, steps=start + steps,
                accounted=opt.state_dict()["prism"]["accountant"]["history"], epsilon=opt.privacy_spent()[0],
                optimizer=opt.state_dict(), base_share=base_share(model),
                sharded_modules=sorted(type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FSDP")))


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out = sys.argv[1]
    results = dict(prism=train(), naive=train(NaiveDPLoRA), noiseless=train(noise=0.0),
                   lora_whole=train(lora_sharded=False), mixed=train(mixed=True))
    first = train(steps=2)
    results.update(first=first, resumed=train(steps=2, state=first))
    results["world"] = distributed.world()
    torch.save(results, os.path.join(out, f"rank{distributed.world()[1]}.pt"))
    dist.destroy_process_group()
