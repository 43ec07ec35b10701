"""prism on a CUDA device: the same steps as on the CPU, noise drawn on the GPU, the Trainer path.

Skipped where torch sees no GPU; tests/test_kernels.py checks the CUDA kernels themselves.
"""

import math

import pytest
import torch

import prism.hf
from helpers import (TensorDataset, assemble, make_batch, per_example_losses, stack_collate, tiny_model,
                     token_halves)
from prism import NaiveDPLoRA, PRISM, kernels
from prism.manifold import tangent_basis
from prism.pipeline.noise import noise_energy, tangent_noise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def one_step(cls, kind, device, mode, noise_multiplier=0.0, generator="seeded", dtype=torch.float32):
    """Norms, pre-noise clipped sums and updated factors after one step of `cls` on `device`
    (generator: "seeded", or what the optimizer gets: None or "secure")."""
    model = tiny_model(kind, r=4, dtype=dtype, init="pissa" if cls is PRISM else True).to(device)
    if generator == "seeded":
        generator = torch.Generator(device).manual_seed(3)
    opt = cls(model, lr=0.05, noise_multiplier=noise_multiplier, max_grad_norm=0.5, expected_batch_size=6,
              generator=generator)
    batch = {k: v.to(device) for k, v in make_batch(kind, b=6, seed=5).items()}
    with kernels.use(mode):
        per_example_losses(kind, model, batch).sum().backward()
        norms = opt.stats.last_norms.clone()
        sums = [s for name, module_sums in opt.clipped_sums().items() for s in module_sums]
        opt.step()
    factors = [p.detach().clone() for pair in opt.pairs for p in (pair.lora_A.weight, pair.lora_B.weight)]
    return opt, [norms, *sums, *factors]


@pytest.mark.parametrize("cls", [PRISM, NaiveDPLoRA])
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_a_noiseless_step_on_cuda_matches_the_cpu(cls, kind, mode):
    _, on_cpu = one_step(cls, kind, "cpu", mode)
    opt, on_gpu = one_step(cls, kind, "cuda", mode)
    if mode == "auto" and cls is PRISM:
        assert kernels.backend("cuda") == "cuda"
    assert all(t.device.type == "cuda" for t in on_gpu)
    for got, ref in zip(on_gpu, on_cpu):
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("generator", [None, "secure"])
def test_noise_is_drawn_on_the_gpu(generator):
    """Entropy-seeded and secure generators work on CUDA: a noisy step moves the factors, and two
    optimizers draw different noise."""
    noiseless = one_step(PRISM, "llama", "cuda", "auto")[1]
    factors = []
    for _ in range(2):
        opt, state = one_step(PRISM, "llama", "cuda", "auto", noise_multiplier=50.0, generator=generator)
        assert opt.generator.device.type == "cuda"
        factors.append(state[-2 * len(opt.pairs):])
    moved = [(a - b).norm().item() for a, b in zip(factors[0], noiseless[-len(factors[0]):])]
    assert all(m > 0 for m in moved)
    assert any((a - b).abs().max() > 0 for a, b in zip(*factors))


def test_tangent_noise_energy_on_cuda_is_the_closed_form():
    """E||noise in Z||^2 = std^2 r (m + n - r) (docs/method.md 3.3), drawn with a CUDA generator."""
    g = torch.Generator("cuda").manual_seed(0)
    m, n, r, std, draws = 30, 20, 3, 0.7, 2000
    A = torch.randn(m, r, device="cuda", dtype=torch.float64, generator=g)
    B = torch.randn(n, r, device="cuda", dtype=torch.float64, generator=g)
    basis = tangent_basis(A, B)
    energy = torch.stack([assemble(*tangent_noise(basis, std, g), basis) for _ in range(draws)]).square().sum((1, 2))
    dim = r * (m + n - r)
    assert abs(energy.mean().item() / noise_energy(std, m, n, r) - 1) < 4 * math.sqrt(2 / (dim * draws))


@pytest.mark.filterwarnings("ignore:TrainingArguments.max_grad_norm")
def test_the_trainer_trains_privately_on_cuda(tmp_path):
    from transformers import Trainer, TrainingArguments

    data = token_halves(1024, 0)
    model = tiny_model("bert", r=4, hidden=32, num_labels=2, dtype=torch.float32)
    opt = PRISM(model.cuda(), lr=0.05, target_epsilon=8.0, delta=1e-5, dataset_size=1024, expected_batch_size=64,
                steps=20, max_grad_norm=1.0, generator=torch.Generator("cuda").manual_seed(1))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=32, gradient_accumulation_steps=2,
                             logging_steps=5, save_strategy="no", report_to="none", disable_tqdm=True,
                             lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=TensorDataset(data), data_collator=stack_collate,
                      optimizers=(opt, None))
    prism.hf.make_private(trainer, sampling_seed=2)
    metrics = trainer.train().metrics
    assert next(model.parameters()).device.type == "cuda" and opt.steps_taken == 20
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[-1]["loss"] < logs[0]["loss"] and 7.0 < metrics["epsilon"] <= 8.0


@pytest.mark.parametrize("preconditioner", ["one_sided", "two_sided"])
def test_fsdp2_bf16_on_a_cuda_rank_trains_like_the_unsharded_model(tmp_path, preconditioner):
    """prism.shard_model with bf16 compute and fp32 reduction on one CUDA rank (nccl, world size 1): DTensor
    parameters on the GPU, the whole-value state, the compiled kernels under FSDP2's hooks. Three noiseless
    steps land within bf16's rounding of the unsharded fp32 model's. (Not NaiveDPLoRA: without noise its first
    Adam steps are about lr * sign(g), so bf16 rounding flips the coordinates whose gradient is near 0.)"""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from prism.sharding import gather_whole, is_sharded

    if not dist.is_nccl_available():
        pytest.skip("torch.distributed has no nccl backend")
    batch = {k: v.cuda() for k, v in make_batch("llama", b=6, seed=5).items()}
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        trained = []
        for sharded in (False, True):
            model = tiny_model("llama", r=4, dtype=torch.float32).cuda()
            if sharded:
                prism.shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                        reduce_dtype=torch.float32))
            opt = PRISM(model, lr=0.05, noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=6,
                        preconditioner=preconditioner)
            for _ in range(3):
                per_example_losses("llama", model, batch).sum().backward()
                opt.step()
                opt.zero_grad()
            trained.append({name: (gather_whole(p) if is_sharded(p) else p.detach()).float().clone()
                            for name, p in model.named_parameters() if p.requires_grad})
    finally:
        dist.destroy_process_group()
    unsharded, sharded = trained
    assert sharded.keys() == unsharded.keys() and sharded
    assert any(is_sharded(p) for p in model.parameters())
    for name, value in unsharded.items():
        assert torch.isfinite(sharded[name]).all(), name
        torch.testing.assert_close(sharded[name], value, rtol=0.05, atol=0.02, msg=name)
