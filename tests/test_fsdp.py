"""FSDP2: prism's private step on a model sharded with fully_shard, 2 CPU processes (gloo) launched by
torchrun, against one unsharded process on the same global batches. The runs are in fsdp_worker.py."""

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import fsdp_worker as runs
from helpers import lora_Z, tiny_model
from prism import PRISM
from test_distributed import torchrun

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    done = torchrun(str(out), worker=runs.__file__)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_like_one_process(ranks, key, reference, rtol=1e-6, atol=1e-6):
    for got in ranks:
        assert got[key]["params"].keys() == reference["params"].keys()
        for name, value in reference["params"].items():
            assert torch.equal(got[key]["params"][name], ranks[0][key]["params"][name]), name  # the same whole value
            torch.testing.assert_close(got[key]["params"][name], value, rtol=rtol, atol=atol)  # sum order only
        assert got[key]["accounted"] == reference["accounted"]


@pytest.mark.parametrize("key, options", [("prism", {}), ("naive", {"cls": runs.NaiveDPLoRA}),
                                          ("noiseless", {"noise": 0.0}), ("lora_whole", {})],
                         ids=["prism", "naive", "noise off", "lora factors not sharded"])
def test_two_sharded_ranks_train_like_one_process(ranks, key, options):
    """The noise is drawn once from rank 0's generator (rank 1 was given another seed); each drawn
    example is used by exactly one rank, and a rank with an empty share ran a placeholder pass."""
    reference = runs.train(sharded=False, **options)
    assert_like_one_process(ranks, key, reference)
    assert max((z - z0).abs().max() for z, z0 in zip(lora_Z_of(reference["params"]), lora_Z(tiny_model("llama")))) > 1e-3
    for step in range(runs.STEPS):  # two micro-batches per draw on every rank
        draw = sum(reference["shares"][2 * step:2 * step + 2], [])
        assert sorted(i for got in ranks for micro in got[key]["shares"][2 * step:2 * step + 2] for i in micro) == draw
    assert sum(got[key]["placeholders"] for got in ranks) > 0


def lora_Z_of(params: dict) -> list[torch.Tensor]:
    """Z = lora_B.weight @ lora_A.weight of every LoRA layer, from a name -> tensor dict."""
    return [params[name.replace("lora_A", "lora_B")] @ value for name, value in params.items() if "lora_A" in name]


def test_each_rank_stores_half_of_the_frozen_base(ranks):
    shares = [got["prism"]["base_share"] for got in ranks]
    assert all(0.4 < share < 0.6 for share in shares) and abs(sum(shares) - 1) < 1e-9


def test_resumed_from_a_checkpoint_continues_the_run(ranks):
    """2 steps, optimizer.state_dict() and the whole trained weights saved, a new sharded model and
    optimizer resumed for 2 more: the 4-step run (epsilon, batches and noise continue)."""
    for got in ranks:
        assert got["resumed"]["epsilon"] == got["prism"]["epsilon"]
        assert got["resumed"]["accounted"] == got["prism"]["accounted"]
        assert got["first"]["shares"] + got["resumed"]["shares"] == got["prism"]["shares"]
        for name, value in got["prism"]["params"].items():
            torch.testing.assert_close(got["resumed"]["params"][name], value, rtol=1e-6, atol=1e-6)


def test_bf16_mixed_precision_through_shard_model_trains_like_fp32(ranks):
    """prism.shard_model shards the modules the recipe does; FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 parameters and reduction) on CPU: prism's sums,
    noise and step stay fp32, so the run differs from fp32 by bf16 rounding of the activations only."""
    reference = runs.train(sharded=False)
    for got in ranks:
        assert len(got["prism"]["sharded_modules"]) == 3  # 2 decoder layers and the root
        assert got["mixed"]["sharded_modules"] == got["prism"]["sharded_modules"]  # shard_model = the recipe
        for name, value in reference["params"].items():
            assert got["mixed"]["params"][name].dtype == torch.float32
            torch.testing.assert_close(got["mixed"]["params"][name], value, rtol=0.05, atol=0.02)


def _refusal_at_first_step(setup: str) -> str:
    """Run `setup` (which builds `opt` on the tiny Llama `model`) in a fresh 1-process gloo group, then
    opt.step(); the RuntimeError it raises, as printed ("REFUSED: ..."), or the process' output."""
    script = f"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {str(runs.__file__.rsplit('/', 1)[0])!r})
from fsdp_worker import shard
from helpers import tiny_model
from prism import PRISM
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29541")
dist.init_process_group("gloo", rank=0, world_size=1)
model = tiny_model("llama", dtype=torch.float32)
try:
{setup}
    opt.step()
except RuntimeError as exc:
    print("REFUSED:", exc)
finally:
    dist.destroy_process_group()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr[-2000:]


def test_sharding_after_building_the_optimizer_is_refused():
    out = _refusal_at_first_step("""
    opt = PRISM(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    shard(model)""")
    assert "REFUSED: the model was sharded (fully_shard) after the optimizer was built" in out, out


def test_writing_into_a_sharded_parameter_outside_the_optimizer_is_refused():
    out = _refusal_at_first_step("""
    shard(model)
    opt = PRISM(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    with torch.no_grad():
        opt.pairs[0].lora_A.weight.to_local()[0, 0] += 1.0""")
    assert "REFUSED: a sharded trained parameter was changed outside the optimizer" in out, out


def test_fsdp1_is_refused_with_the_fsdp2_route():
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Wrapped(FullyShardedDataParallel):  # FSDP1 itself cannot be built without an accelerator
        def __init__(self, module):
            torch.nn.Module.__init__(self)
            self.module = module

    with pytest.raises(TypeError, match="FSDP1.*fully_shard"):
        PRISM(Wrapped(tiny_model("llama")), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)


def test_data_parallel_is_refused():
    with pytest.raises(TypeError, match="torchrun"):
        PRISM(torch.nn.DataParallel(tiny_model("llama")), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0,
              expected_batch_size=4)
