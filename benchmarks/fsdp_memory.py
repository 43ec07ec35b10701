"""Memory per rank of prism under FSDP2: measured on a random-init Llama, and on paper for Llama-3 8B / 70B.

    python -m benchmarks.fsdp_memory [--quick]        (starts torchrun with 2 CPU processes itself)

Measured (each rank, gloo on CPU): the model is built on the meta device, sharded with FSDP2's
standard recipe (fully_shard on every decoder layer, then the root), materialised (`to_empty`) and
filled with public random weights, so no rank ever holds the whole base. Then a few private PRISM steps
(LoRA r = 16 on q, k, v, o; micro-batches of 2 sequences of 32 tokens). Reported per rank: the frozen
base's bytes stored, the optimizer state's bytes (prism keeps the whole LoRA factors: method 3.6 and
usage 6.1), the peak resident memory during the steps (VmHWM, reset after building) and the step time.

On paper (`paper_memory`), per rank with W ranks: the stored parameters (base bytes / W and the fp32 LoRA
factors' parts), prism's state (whole factors fp32 + first moments fp32: 8 bytes per LoRA parameter), the clipped
sums (4 bytes per LoRA parameter), the per-example blocks of one micro-batch (4 b bytes per LoRA
parameter: Y and W have the factors' shapes), and FSDP2's transient whole layers (two decoder layers
gathered at once, forward prefetch). Activations are the model's and the sequence length's business
and are left out.

Results: benchmarks/results/fsdp_memory.json (the measured ranks and the paper table), printed as tables.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib

import torch

from . import common

LLAMA = {  # (hidden, layers, intermediate, heads, kv heads, vocab)
    "llama-3-8b": (4096, 32, 14336, 32, 8, 128256),
    "llama-3-70b": (8192, 80, 28672, 64, 8, 128256),
}
MEASURED = dict(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000)  # ~1.1B parameters
QUICK = dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=256)
RANK, STEPS, MICRO, SEQ = 16, 3, 2, 32


def lora_parameters(hidden: int, layers: int, heads: int, kv_heads: int, r: int) -> int:
    """LoRA parameters on q, k, v, o: r (in + out) per projection."""
    kv = hidden // heads * kv_heads
    return layers * r * ((hidden + hidden) * 2 + (hidden + kv) * 2)


def base_parameters(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> int:
    """A Llama's parameters (untied embeddings, RMSNorm weights)."""
    kv = hidden // heads * kv_heads
    layer = hidden * (2 * hidden + 2 * kv) + 3 * hidden * intermediate + 2 * hidden
    return layers * layer + 2 * vocab * hidden + hidden


def paper_memory(hidden, layers, intermediate, heads, kv_heads, vocab, *, world: int, base_bytes: float,
                 micro_batch: int = 8, r: int = RANK) -> dict:
    """GiB per rank by part (see the module docstring); base_bytes per parameter: 2 (bf16), ~0.56 (4-bit)."""
    gib = 2 ** 30
    P_L = lora_parameters(hidden, layers, heads, kv_heads, r)
    P = base_parameters(hidden, layers, intermediate, heads, kv_heads, vocab)
    kv = hidden // heads * kv_heads
    layer = hidden * (2 * hidden + 2 * kv) + 3 * hidden * intermediate
    parts = dict(stored_parameters=P * base_bytes / world + 4 * P_L / world, gathered_layers=2 * layer * base_bytes,
                 prism_state=8 * P_L, clipped_sums=4 * P_L, per_example=4 * micro_batch * P_L)
    out = {k: round(v / gib, 3) for k, v in parts.items()}
    out.update(total=round(sum(parts.values()) / gib, 2), lora_parameters=P_L, base_parameters=P)
    return out


def _vm(field: str) -> float:
    """A /proc/self/status field in GiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:  # "5" resets VmHWM to the current resident size
        handle.write("5")


def _public_init(model) -> None:
    """Seeded N(0, 0.02^2) for every parameter (LoRA factors: full rank), the same whole value on every rank,
    each rank writing only its part; buffers recomputed."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from prism.sharding import is_sharded, write_local_part

    for name, p in model.named_parameters():
        whole = torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.02
        if "norm" in name:
            whole = torch.ones(p.shape)
        if is_sharded(p):
            write_local_part(p, whole)
        else:
            with torch.no_grad():
                p.copy_(whole)
    inner = model.base_model.model.model
    inner.rotary_emb = LlamaRotaryEmbedding(inner.config)


def rank_run(shape: dict) -> dict:
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    import prism
    from prism.losses import per_example_causal_lm_loss
    from prism.sharding import is_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    config = LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         intermediate_size=shape["intermediate"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"], max_position_embeddings=64)
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
            r=RANK, lora_alpha=RANK, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    _public_init(model)
    n = 64 * dist.get_world_size()
    opt = prism.PRISM(model, lr=1e-3, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=MICRO * 2,
                      dataset_size=n, delta=1e-5, loss_reduction="sum", metric="balanced",
                      preconditioner="one_sided")  # as measured (results/fsdp_memory.json)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    local = sum((p.to_local() if is_sharded(p) else p).numel() * p.element_size() for p in frozen)
    whole_base = sum(p.numel() * p.element_size() for p in frozen)
    data = torch.randint(1, shape["vocab"], (MICRO, SEQ), generator=torch.Generator().manual_seed(dist.get_rank()))
    _reset_peak()
    times = []
    for _ in range(STEPS):
        start = time.time()
        logits = model(input_ids=data).logits
        per_example_causal_lm_loss(logits, data).sum().backward()
        opt.step()
        opt.zero_grad()
        times.append(time.time() - start)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    gib = 2 ** 30
    result = dict(rank=dist.get_rank(), world=dist.get_world_size(), base_gib_stored=round(local / gib, 3),
                  base_gib_whole=round(whole_base / gib, 3), prism_state_gib=round(state / gib, 3),
                  peak_rss_gib=round(_vm("VmHWM"), 2), rss_gib=round(_vm("VmRSS"), 2),
                  step_seconds=round(min(times), 2))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    dist.destroy_process_group()
    return dict(ranks=gathered, lora_parameters=lora_parameters(shape["hidden"], shape["layers"], shape["heads"],
                                                                shape["kv_heads"], RANK),
                base_parameters=base_parameters(**shape)) if result["rank"] == 0 else None


def paper_table() -> dict:
    """Per model, base precision and number of ranks: paper_memory's parts."""
    return {f"{name}, {precision} base, {world} ranks": paper_memory(*shape, world=world, base_bytes=bytes_)
            for name, shape in LLAMA.items() for precision, bytes_ in (("bf16", 2.0), ("4-bit", 0.56))
            for world in ((8,) if name == "llama-3-70b" else (2, 8))}


def main(argv=None) -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    common.quiet()
    shape = QUICK if args.quick else MEASURED
    if "RANK" not in os.environ:  # start the 2 ranks
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "benchmarks.fsdp_memory", *sys.argv[1:]]
        sys.exit(subprocess.call(command))
    measured = rank_run(shape)
    if measured is None:
        return
    result = dict(measured=dict(shape=shape, **measured), paper=paper_table(),
                  predicted_for_measured=paper_memory(*shape.values(), world=2, base_bytes=4.0, micro_batch=MICRO))
    for row in measured["ranks"]:
        print(row)
    print("predicted (fp32 base, 2 ranks):", result["predicted_for_measured"])
    for name, row in result["paper"].items():
        print(f"{name}: {row}")
    common.write_json(common.out_dir(args) / "fsdp_memory.json", dict(result, **common.provenance()))


if __name__ == "__main__":
    main()
