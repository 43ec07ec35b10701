"""Poisson sampling, micro-batching, and the optimizer's coupling to its accountant."""

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers import make_batch, per_example_losses, tiny_model
from prism import (PRISM, EmptyBatch, NaiveDPLoRA, NonPoissonSampling, PoissonBatchSampler, PrivacyBudgetExceeded,
                   calibrate_noise_multiplier, micro_batches, poisson_data_loader)
from prism.accounting import epsilon_for
from prism.sampling import split_evenly


def test_sampler_rate_and_independence():
    N, q, steps = 400, 0.05, 600
    sampler = PoissonBatchSampler(N, q, steps, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(steps, N)
    for t, batch in enumerate(sampler):
        masks[t, batch] = 1
    assert len(sampler) == steps and sampler.expected_batch_size == pytest.approx(20)
    rate = masks.mean().item()
    assert abs(rate - q) < 4 * (q * (1 - q) / masks.numel()) ** 0.5
    sizes = masks.sum(1)
    assert abs(sizes.var().item() / (N * q * (1 - q)) - 1) < 0.2  # Binomial(N, q) sizes
    both = (masks[1:] * masks[:-1]).mean().item()  # consecutive steps independent: P(i in both) = q^2
    assert abs(both - q * q) < 4 * (q * q / masks[1:].numel()) ** 0.5


def test_sampler_produces_empty_batches_and_epochs():
    sampler = PoissonBatchSampler(10, 0.01, epochs=1, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == 100 and any(len(b) == 0 for b in batches)
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonBatchSampler(10, 0.0, 5)


def test_micro_batched_draws_are_the_plain_draws_cut():
    """The Trainer's micro-batches and the plain loop's batches are the same draws, whatever the source."""
    for source in (dict(seed=7), dict(generator=0)):
        def sampler(**kwargs):
            given = {k: torch.Generator().manual_seed(v) if k == "generator" else v for k, v in source.items()}
            return PoissonBatchSampler(300, 0.05, 20, **given, **kwargs)

        plain, cut = list(sampler()), list(sampler(micro_batches=3))
        assert len(cut) == len(sampler(micro_batches=3)) == 60 and len(plain) == 20
        assert [sum(cut[3 * t:3 * t + 3], []) for t in range(20)] == plain
        assert all(max(map(len, cut[3 * t:3 * t + 3])) - min(map(len, cut[3 * t:3 * t + 3])) <= 1 for t in range(20))


def test_a_seeded_sampler_resumed_at_step_t_draws_what_the_uninterrupted_one_did():
    whole = PoissonBatchSampler(500, 0.1, 10, seed=3)
    uninterrupted = list(whole) + list(whole)  # a second pass goes on with draws 10-19
    assert whole.next_step == 20 and uninterrupted[:10] != uninterrupted[10:]
    assert list(PoissonBatchSampler(500, 0.1, 6, seed=3, start_step=14)) == uninterrupted[14:]
    resumed = PoissonBatchSampler(500, 0.1, 3, seed=3, micro_batches=2)
    resumed.next_step = 4  # what the Trainer integration sets on resume
    pieces = list(resumed)
    assert [sum(pieces[2 * i:2 * i + 2], []) for i in range(3)] == uninterrupted[4:7]
    sizes = [len(draw) for draw in uninterrupted]
    assert len(set(sizes)) > 1 and abs(sum(sizes) / 20 - 50) < 10


@pytest.mark.parametrize("micro", [1, 2])
def test_every_rank_takes_its_share_of_the_same_draw(monkeypatch, micro):
    """Under torch.distributed (simulated: 2 ranks, rank 0's seed or generator state already shared)
    each rank keeps its chunk of every draw; the shares are disjoint and together are the draw."""
    from prism import distributed

    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: obj)
    monkeypatch.setattr(distributed, "broadcast_generator", lambda generator: generator)
    single = list(PoissonBatchSampler(40, 0.1, 30, seed=2))
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (2, rank))
        pieces = list(PoissonBatchSampler(40, 0.1, 30, seed=2, micro_batches=micro))
        shares.append([sum(pieces[micro * t:micro * t + micro], []) for t in range(30)])
    assert [a + b for a, b in zip(*shares)] == single
    assert all(abs(len(a) - len(b)) <= 1 for a, b in zip(*shares)) and [] in shares[1]


def test_split_evenly():
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([1], 3) == [[1], [], []]


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=1, generator=torch.Generator()), "a generator or a seed, not both"),
    (dict(micro_batches=0), "micro_batches must be an integer >= 1"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(start_step=1.5), "start_step must be an integer >= 0"),
])
def test_bad_sampler_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoissonBatchSampler(10, 0.5, 3, **kwargs)


def test_poisson_data_loader_keeps_dataset_and_collate_and_yields_empty_batches():
    data = TensorDataset(torch.arange(20).float()[:, None], torch.arange(20))
    calls = []

    def collate(examples):
        calls.append(len(examples))
        return {"x": torch.stack([e[0] for e in examples]), "y": torch.stack([e[1] for e in examples])}

    loader = poisson_data_loader(DataLoader(data, batch_size=4, collate_fn=collate), expected_batch_size=1.0,
                                 steps=200, generator=torch.Generator().manual_seed(0))
    sizes = []
    for batch in loader:
        if isinstance(batch, EmptyBatch):
            sizes.append(0)
            assert len(batch) == 0 and list(micro_batches(batch, 1)) == []
            continue
        sizes.append(batch["x"].shape[0])
        assert batch["x"].shape[1:] == (1,) and batch["y"].shape[0] == sizes[-1] > 0
        assert len(list(micro_batches(batch, 1))) == sizes[-1]
    assert 0 in sizes and max(sizes) > 1 and abs(sum(sizes) / 200 - 1.0) < 0.25
    assert 0 not in calls  # an empty batch never reads an example


def _seed_nothing(worker_id):
    pass


def test_poisson_data_loader_keeps_the_worker_settings():
    data = TensorDataset(torch.arange(20).float()[:, None])
    original = DataLoader(data, batch_size=4, num_workers=2, persistent_workers=True, prefetch_factor=3,
                          worker_init_fn=_seed_nothing, timeout=30)
    loader = poisson_data_loader(original, expected_batch_size=4.0, steps=5)
    settings = ("num_workers", "persistent_workers", "prefetch_factor", "worker_init_fn", "timeout", "pin_memory")
    assert {k: getattr(loader, k) for k in settings} == {k: getattr(original, k) for k in settings}


def test_the_optimizers_loader_draws_at_its_rate_for_its_steps():
    data = TensorDataset(torch.arange(200).float()[:, None])
    opt = PRISM(tiny_model("bert"), lr=0.01, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=10,
                dataset_size=200, steps=300)
    loader = opt.poisson_data_loader(DataLoader(data), generator=torch.Generator().manual_seed(0))
    sizes = [0 if isinstance(batch, EmptyBatch) else len(batch[0]) for batch in loader]
    assert len(sizes) == 300 and abs(sum(sizes) / 300 - 10) < 4 * (10 * 0.95 / 300) ** 0.5
    with pytest.raises(ValueError, match="has 100 examples but the optimizer was built for 200"):
        opt.poisson_data_loader(DataLoader(TensorDataset(torch.zeros(100, 1))))
    with pytest.warns(UserWarning, match="NOT a valid"):  # empty steps only here
        resumed = PRISM(tiny_model("bert"), lr=0.01, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=10,
                        dataset_size=200, steps=3, allow_non_poisson=True)
    resumed.step()
    assert len(resumed.poisson_data_loader(DataLoader(data))) == 2  # the steps not taken yet
    resumed.step()
    resumed.step()
    with pytest.raises(ValueError, match="all 3 planned steps"):
        resumed.poisson_data_loader(DataLoader(data))
    unplanned = PRISM(tiny_model("bert"), lr=0.01, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=10,
                      dataset_size=200)
    with pytest.raises(ValueError, match="steps"):
        unplanned.poisson_data_loader(DataLoader(data))


def test_micro_batches_and_the_probe_keep_a_defaultdict_batch():
    from collections import defaultdict

    from prism.sampling import replace_examples

    batch = defaultdict(list, x=torch.arange(4), y=torch.arange(4) * 2)
    parts = list(micro_batches(batch, 3))
    assert [type(p) for p in parts] == [defaultdict] * 2 and parts[1]["x"].tolist() == [3]
    assert parts[0].default_factory is list
    swapped = replace_examples(batch, torch.tensor([3, 1, 2, 3]), 4)
    assert type(swapped) is defaultdict and swapped["y"].tolist() == [6, 2, 4, 6] and batch["x"].tolist() == [0, 1, 2, 3]


def test_micro_batches_split_nested_batches():
    from collections import namedtuple

    from transformers import BatchEncoding

    batch = {"ids": torch.arange(10).reshape(5, 2), "extra": (torch.arange(5), torch.ones(5, 3)),
             "text": list("abcde")}
    pieces = list(micro_batches(batch, 2))
    assert [p["ids"].shape[0] for p in pieces] == [2, 2, 1]
    assert torch.equal(torch.cat([p["extra"][0] for p in pieces]), torch.arange(5))
    assert [p["text"] for p in pieces] == [["a", "b"], ["c", "d"], ["e"]]
    encoding = BatchEncoding({"input_ids": torch.ones(5, 3), "attention_mask": torch.ones(5, 3)})
    assert [type(p).__name__ for p in micro_batches(encoding, 4)] == ["BatchEncoding"] * 2
    Pair = namedtuple("Pair", "x y")
    assert [p.y.tolist() for p in micro_batches(Pair(torch.zeros(3, 2), torch.arange(3)), 2)] == [[0, 1], [2]]
    assert [len(p) for p in micro_batches(["only", "strings", "here"], 2)] == [2, 1]
    arrays = list(micro_batches({"x": np.arange(6).reshape(3, 2), "w": torch.ones(3)}, 2))
    assert [a["x"][:, 0].tolist() for a in arrays] == [[0, 2], [4]]
    per_example = [np.arange(3) + 10 * i for i in range(4)]  # an identity collate_fn's list of examples
    assert [[a[0] for a in p] for p in micro_batches(per_example, 3)] == [[0, 10, 20], [30]]
    Record = namedtuple("Record", "x note")
    assert [p.x.tolist() for p in micro_batches(Record(torch.arange(3), ["a", "b", "c"]), 2)] == [[0, 1], [2]]
    with pytest.raises(TypeError, match="cannot split a float field"):
        list(micro_batches({"x": torch.zeros(3), "temperature": 0.5}, 2))
    with pytest.raises(ValueError, match="max_size"):
        list(micro_batches(batch, 0))
    with pytest.raises(ValueError, match="example axis"):
        list(micro_batches({"ids": torch.zeros(4, 2), "labels": torch.zeros(3)}, 2))


ACCOUNTED = dict(lr=0.01, max_grad_norm=1.0, expected_batch_size=4, dataset_size=400, delta=1e-5)


def _poisson_steps(model, opt, steps, seed=0):
    for step in range(steps):
        size = int(torch.distributions.Binomial(400, 0.01).sample().item()) if step else 0
        if size:
            per_example_losses("bert", model, make_batch("bert", b=size, seed=seed * 1000 + step)).sum().backward()
        opt.step()


@pytest.mark.parametrize("cls", [PRISM, NaiveDPLoRA])
def test_optimizer_accounts_every_step_including_empty_ones(cls):
    model = tiny_model("bert")
    opt = cls(model, noise_multiplier=1.0, **ACCOUNTED)
    _poisson_steps(model, opt, 5)
    assert opt.accountant.steps == opt.steps_taken == 5
    assert opt.get_epsilon() == epsilon_for(1.0, 0.01, 5, 1e-5)
    assert opt.privacy_spent() == (epsilon_for(1.0, 0.01, 5, 1e-5)[2], 1e-5)


def test_target_epsilon_calibrates_sigma():
    opt = PRISM(tiny_model("bert"), target_epsilon=2.0, steps=50, **ACCOUNTED)
    assert opt.noise_multiplier == calibrate_noise_multiplier(2.0, 1e-5, 0.01, 50)
    assert epsilon_for(opt.noise_multiplier, 0.01, 50, 1e-5)[2] <= 2.0
    assert opt.accountant.planned_steps == 50  # its PRV grid is calibration's (see test_accounting)


def test_max_epsilon_stops_before_the_step_that_would_exceed_it():
    allowed = 0
    while epsilon_for(1.0, 0.01, allowed + 1, 1e-5)[2] <= 0.6:
        allowed += 1
    model = tiny_model("bert")
    with pytest.warns(UserWarning, match="NOT a valid"):  # only empty batches here: not Poisson-looking
        opt = PRISM(model, noise_multiplier=1.0, max_epsilon=0.6, allow_non_poisson=True, **ACCOUNTED)
    for _ in range(allowed):
        opt.step()
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    with pytest.raises(PrivacyBudgetExceeded, match="max_epsilon=0.6"):
        opt.step()
    assert opt.steps_taken == allowed and opt.privacy_spent()[0] <= 0.6
    assert all(torch.equal(a, b) for a, b in zip(before, opt.param_groups[0]["params"]))


def test_accountant_survives_a_resume():
    model = tiny_model("bert")
    opt = PRISM(model, noise_multiplier=1.0, **ACCOUNTED)
    _poisson_steps(model, opt, 3)
    resumed = PRISM(model, noise_multiplier=1.0, **ACCOUNTED)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.accountant.steps == 3 and resumed.get_epsilon() == opt.get_epsilon()
    other_rate = PRISM(model, noise_multiplier=1.0, **{**ACCOUNTED, "dataset_size": 800})
    with pytest.raises(ValueError, match="sample_rate"):
        other_rate.load_state_dict(opt.state_dict())


def _steps_with_sizes(opt, model, sizes):
    for step, size in enumerate(sizes):
        if size:
            per_example_losses("bert", model, make_batch("bert", b=size, seed=step)).sum().backward()
        opt.step()


@pytest.mark.parametrize("sizes, message", [
    ([8] * 45, "had the same size"),  # fixed-size batches
    (([8] * 6 + [3]) * 7, "had the same size"),  # shuffled epochs of 50 with a short last batch
    ([int(s) for s in torch.distributions.Binomial(400, 0.06).sample((45,), )], "averaged"),  # 3x the rate
])
def test_non_poisson_batches_are_refused_unless_explicitly_allowed(sizes, message):
    model = tiny_model("bert", hidden=8)
    opt = PRISM(model, noise_multiplier=1.0, **{**ACCOUNTED, "expected_batch_size": 8})
    with pytest.raises(NonPoissonSampling, match=message):
        _steps_with_sizes(opt, model, sizes)
    with pytest.warns(UserWarning, match="NOT a valid privacy guarantee"):
        opt = PRISM(model, noise_multiplier=1.0, allow_non_poisson=True, **{**ACCOUNTED, "expected_batch_size": 8})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _steps_with_sizes(opt, model, sizes)


def test_poisson_batches_pass_the_check():
    model = tiny_model("bert", hidden=8)
    opt = PRISM(model, noise_multiplier=1.0, **{**ACCOUNTED, "expected_batch_size": 8})
    sampler = PoissonBatchSampler(400, 0.02, 60, generator=torch.Generator().manual_seed(0))
    _steps_with_sizes(opt, model, [len(batch) for batch in sampler])
    assert opt.steps_taken == 60


def test_privacy_settings_are_read_only():
    opt = PRISM(tiny_model("bert"), noise_multiplier=1.0, **ACCOUNTED)
    for name in ("noise_multiplier", "max_grad_norm", "dense_max_grad_norm", "expected_batch_size"):
        with pytest.raises(AttributeError):
            setattr(opt, name, 0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_multiplier=1.0, delta=0.01), "1/N"),
    (dict(noise_multiplier=1.0, sample_rate=0.5), "contradicts"),
    (dict(noise_multiplier=1.0, target_epsilon=1.0, steps=10), "exactly one of noise_multiplier"),
    (dict(target_epsilon=1.0), "exactly one of steps or epochs"),
    (dict(noise_multiplier=1.0, max_epsilon=-1.0), "max_epsilon"),
    (dict(noise_multiplier=1.0, dataset_size=0), "dataset_size"),
])
def test_inconsistent_privacy_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PRISM(tiny_model("bert"), **{**ACCOUNTED, **kwargs})


def test_without_a_sampling_rate_there_is_no_epsilon():
    opt = PRISM(tiny_model("bert"), lr=0.01, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    with pytest.raises(RuntimeError, match="sample_rate"):
        opt.privacy_spent(1e-5)
    with pytest.raises(ValueError, match="expected_batch_size is required"):
        PRISM(tiny_model("bert"), lr=0.01, noise_multiplier=1.0, max_grad_norm=1.0)


def test_a_refused_non_finite_update_changes_nothing_but_is_still_accounted():
    model = tiny_model("bert")
    opt = PRISM(model, noise_multiplier=1e300, adaptive=False, **{**ACCOUNTED, "lr": 1e10})
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    with pytest.raises(FloatingPointError, match="not finite"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, opt.param_groups[0]["params"]))
    assert opt.accountant.steps == opt.steps_taken == 1


def test_a_step_beyond_the_planned_steps_warns_once():
    opt = PRISM(tiny_model("bert"), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
                dataset_size=40, steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            opt.step()
    beyond = [str(w.message) for w in caught if "beyond the 2 steps" in str(w.message)]
    assert beyond == [beyond[0]] and beyond[0].startswith("step 3 ")
