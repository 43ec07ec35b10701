"""Data parallel over torch.distributed: 2 CPU processes launched by torchrun (gloo) train exactly
like one process on the same global batches. The runs themselves are in distributed_worker.py."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import distributed_worker as runs
import prism
from helpers import tiny_model
from prism import NaiveDPLoRA, PRISM, PoissonBatchSampler, distributed

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


def torchrun(*args: str, timeout: int = 300, worker: str = runs.__file__) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 <worker> *args` (default distributed_worker.py), running the prism this
    process tests."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               worker, *args]
    source = os.path.dirname(os.path.dirname(prism.__file__))
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path})


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks of `torchrun --nproc_per_node 2 distributed_worker.py` got."""
    out = tmp_path_factory.mktemp("torchrun")
    done = torchrun(str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_an_error_on_one_rank_ends_the_job_instead_of_hanging(tmp_path):
    """Rank 0 waits for rank 1 in a collective; torchrun stops it when rank 1 fails (no timeout hit)."""
    done = torchrun(str(tmp_path), "fail-on-rank-1", timeout=180)
    assert done.returncode != 0
    assert "lr must be" in done.stdout + done.stderr


def assert_same_training(ranks, key, reference):
    for got in ranks:
        assert got[key]["params"].keys() == reference["params"].keys()
        for name, value in reference["params"].items():
            assert torch.equal(got[key]["params"][name], ranks[0][key]["params"][name]), name  # identical replicas
            torch.testing.assert_close(got[key]["params"][name], value, rtol=1e-6, atol=1e-7)  # sum order only
        assert got[key]["accounted"] == reference["accounted"]


@pytest.mark.parametrize("cls", [PRISM, NaiveDPLoRA])
def test_two_ranks_train_like_one_process(ranks, cls):
    """Rank 1 had other sampling and noise seeds and other adapter weights: rank 0's won, each drawn
    example was used by exactly one rank (empty shares included) and the counts are global."""
    key = "prism" if cls is PRISM else "naive"
    reference = runs.plain_loop(cls)
    assert_same_training(ranks, key, reference)
    shares = [r[key]["shares"] for r in ranks]
    for draw, share_0, share_1 in zip(reference["shares"], *shares):
        assert share_0 + share_1 == draw
    assert any(share == [] for share in shares[1]) and any(len(draw) > 1 for draw in reference["shares"])
    assert reference["accounted"] == [(1.0, runs.SAMPLE_RATE, runs.STEPS)]  # the global rate
    assert ranks[0][key]["sizes"] == ranks[1][key]["sizes"] == reference["sizes"] == [len(d) for d in
                                                                                     reference["shares"]]


def test_secure_noise_is_the_same_on_every_rank(ranks):
    """generator="secure": rank 0 refills its generator from os.urandom each step and shares it."""
    secure = [r["secure"] for r in ranks]
    assert secure[0]["accounted"] == secure[1]["accounted"] == [(1.0, runs.SAMPLE_RATE, runs.STEPS)]
    for name, value in secure[0]["params"].items():
        assert torch.equal(secure[1]["params"][name], value), name


def test_trainer_under_torchrun_trains_like_one_process(ranks, tmp_path):
    reference = runs.trainer_run(str(tmp_path))
    assert_same_training(ranks, "trainer", reference)
    for rank, got in enumerate(ranks):
        assert got["world"] == (2, rank) and got["trainer"]["backend"] == "gloo"
        assert got["trainer"]["epsilon"] == reference["epsilon"]
        assert got["trainer"]["steps"] == 3 and got["trainer"]["wrapper"] != "DistributedDataParallel"


def test_trainer_resumed_on_two_ranks_continues_exactly(ranks):
    """Step 3 resumed from the checkpoint of step 2 (optimizer.pt saved by rank 0 only, loaded by
    both ranks) is the uninterrupted step 3: same weights, same epsilon."""
    for got in ranks:
        assert got["resumed"]["steps"] == 3 and got["resumed"]["epsilon"] == got["trainer"]["epsilon"]
        for name, value in got["trainer"]["params"].items():
            assert torch.equal(got["resumed"]["params"][name], value), name


def test_misuse_is_refused_on_every_rank(ranks):
    for got in ranks:
        assert "ddp_model.module" in got["refused"]["ddp"]
        assert "frozen weights" in got["refused"]["frozen_weights"]
        assert "privacy settings differ" in got["refused"]["settings"]
        assert "replicas differ" in got["refused"]["diverged"]
        assert "FSDP2" in got["refused"]["trainer_fsdp"] and "fully_shard" in got["refused"]["trainer_fsdp"]


def test_starting_torch_distributed_after_building_is_refused(monkeypatch):
    model = tiny_model("bert")
    opt = PRISM(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    sampler = PoissonBatchSampler(16, 0.25, 2)
    monkeypatch.setattr(distributed, "world", lambda: (2, 0))
    with pytest.raises(RuntimeError, match="after torch.distributed.init_process_group"):
        next(iter(sampler))
    with pytest.raises(RuntimeError, match="after torch.distributed.init_process_group"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.uint8])
def test_fingerprint_sees_any_change_and_ignores_layout(dtype):
    t = (torch.randn(5, 7) * 10).to(dtype)
    assert torch.equal(distributed.fingerprint([t]), distributed.fingerprint([t.T.contiguous().T]))
    changed = t.clone()
    changed.view(torch.uint8).view(-1)[9] ^= 1  # one bit of one element
    assert not torch.equal(distributed.fingerprint([t]), distributed.fingerprint([changed]))
