"""Private training runs shared by tests/test_distributed.py: run in one process for the reference,
and by `torchrun --nproc_per_node 2 distributed_worker.py OUT` on 2 CPU processes (gloo), where
each rank saves what it got to OUT/rank<r>.pt.

Rank 1 is given other randomness (sampling and noise seeds, perturbed adapter weights) on
purpose: rank 0's must win everywhere, or the runs would not match the single process.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import TensorDataset, make_batch, per_example_losses, select, stack_collate, tiny_model  # noqa: E402
from prism import NaiveDPLoRA, PRISM, PoissonBatchSampler, distributed, micro_batches  # noqa: E402

N, SAMPLE_RATE, STEPS = 16, 0.125, 4  # draws of 0 or 1 examples leave some rank's share empty


def trained(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def rank_specific(seed: int) -> torch.Generator | None:
    """A seeded generator on rank 0, entropy-seeded (None) elsewhere."""
    return torch.Generator().manual_seed(seed) if distributed.world()[1] == 0 else None


def perturb_off_rank_0(model) -> None:
    if distributed.world()[1] != 0:
        with torch.no_grad():
            for p in trained(model).values():
                p.add_(0.1 * torch.randn(p.shape))


def plain_loop(cls, generator: str | None = None) -> dict:
    """STEPS private steps of `cls` on a tiny BERT (LoRA + classifier head), micro-batches of 2;
    generator="secure" for noise from fresh OS entropy every step."""
    model = tiny_model("bert", dtype=torch.float32)
    perturb_off_rank_0(model)
    data = make_batch("bert", N, seed=1)
    opt = cls(model, lr=0.05, max_grad_norm=0.5, noise_multiplier=1.0, sample_rate=SAMPLE_RATE, dataset_size=N,
              delta=1e-3, loss_reduction="sum", generator=generator or rank_specific(1))
    shares = []
    for indices in PoissonBatchSampler(N, SAMPLE_RATE, STEPS, generator=rank_specific(2)):
        shares.append(indices)
        for micro in micro_batches(indices, 2):
            per_example_losses("bert", model, select(data, micro)).sum().backward()
        opt.step()
    prism_state = opt.state_dict()["prism"]
    return dict(shares=shares, params=trained(model), accounted=prism_state["accountant"]["history"],
                sizes=prism_state["sampling_check"]["sizes"])


def trainer_run(output_dir: str, resume: bool = False) -> dict:
    """3 private steps through a vanilla Trainer made private (2 micro-batches per step), saving a
    checkpoint after step 2; with `resume`, only step 3, resumed from that checkpoint."""
    from transformers import Trainer, TrainingArguments

    import prism.hf

    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=3, logging_steps=1, save_strategy="steps", save_steps=2, report_to="none",
                             use_cpu=True, disable_tqdm=True, max_grad_norm=0.0, lr_scheduler_type="constant")
    model = tiny_model("bert", dtype=torch.float32)
    perturb_off_rank_0(model)
    opt = PRISM(model, lr=0.05, max_grad_norm=0.5, noise_multiplier=1.0, expected_batch_size=8, dataset_size=32,
                delta=1e-3, generator=rank_specific(3))
    trainer = Trainer(model=model, args=args, train_dataset=TensorDataset(make_batch("bert", 32, seed=4)),
                      data_collator=stack_collate, optimizers=(opt, None))
    prism.hf.make_private(trainer, sampling_seed=5 + distributed.world()[1])
    trainer.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-2") if resume else None)
    return dict(params=trained(model), epsilon=opt.privacy_spent()[0], steps=trainer.state.global_step,
                accounted=opt.state_dict()["prism"]["accountant"]["history"],
                wrapper=type(trainer.model_wrapped).__name__, backend=torch.distributed.get_backend()
                if distributed.world()[0] > 1 else None)


def refusals() -> dict:
    """Which misuses each rank refused (every rank must refuse together, or the others would hang)."""
    import torch.distributed as dist

    refused = {}
    model = tiny_model("bert", dtype=torch.float32)
    try:
        PRISM(torch.nn.parallel.DistributedDataParallel(model), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0,
              expected_batch_size=4)
    except TypeError as exc:
        refused["ddp"] = str(exc)
    try:
        PRISM(tiny_model("bert", dtype=torch.float32, seed=dist.get_rank()), lr=0.1, noise_multiplier=1.0,
              max_grad_norm=1.0, expected_batch_size=4)
    except ValueError as exc:
        refused["frozen_weights"] = str(exc)
    try:
        PRISM(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, dense_max_grad_norm=1.0 + dist.get_rank(),
              expected_batch_size=4)
    except ValueError as exc:
        refused["settings"] = str(exc)
    refused["trainer_fsdp"] = trainer_fsdp_refusal()
    opt = PRISM(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    opt.step()
    if dist.get_rank() == 1:
        with torch.no_grad():
            opt.pairs[0].lora_A.weight[0, 0] += 1e-3
    try:
        opt.step()
    except RuntimeError as exc:
        refused["diverged"] = str(exc)
    return refused


def trainer_fsdp_refusal() -> str:
    """make_private on a Trainer set up for accelerate's FSDP (version 2): the refusal's message."""
    from transformers import Trainer, TrainingArguments

    import prism.hf

    import tempfile

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", fsdp="full_shard",
                             fsdp_config={"fsdp_version": 2}, max_grad_norm=0.0)
    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, lr=0.1, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, dataset_size=32,
                delta=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=TensorDataset(make_batch("bert", 32)),
                      data_collator=stack_collate, optimizers=(opt, None))
    try:
        prism.hf.make_private(trainer)
    except NotImplementedError as exc:
        return str(exc)
    finally:
        opt.remove_hooks()
    return "not refused"


def fail_on_rank_1() -> None:
    """Rank 1 raises while building its optimizer; rank 0 waits for it in the replica broadcast."""
    dist.init_process_group("gloo")
    lr = -1.0 if dist.get_rank() == 1 else 0.1
    PRISM(tiny_model("bert", dtype=torch.float32), lr=lr, noise_multiplier=1.0, max_grad_norm=1.0,
          expected_batch_size=4)
    dist.barrier()


if __name__ == "__main__" and sys.argv[2:] == ["fail-on-rank-1"]:
    fail_on_rank_1()
elif __name__ == "__main__":
    out = sys.argv[1]
    results = dict(trainer=trainer_run(os.path.join(out, "trainer")))  # TrainingArguments starts torch.distributed
    results["resumed"] = trainer_run(os.path.join(out, "trainer"), resume=True)
    results.update(prism=plain_loop(PRISM), naive=plain_loop(NaiveDPLoRA), secure=plain_loop(PRISM, "secure"),
                   refused=refusals(),
                   world=distributed.world())
    torch.save(results, os.path.join(out, f"rank{distributed.world()[1]}.pt"))
    # an exit with the process group alive can abort in gloo's teardown ("terminate called without an active
    # exception", seen under load): close it first
    dist.barrier()
    dist.destroy_process_group()
