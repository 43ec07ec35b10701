"""generator="secure": the whole generator state refilled from os.urandom before every step's
noise, recorded nowhere; the noise keeps its distribution."""

import copy

import pytest
import torch

from helpers import tiny_model
from prism import NaiveDPLoRA
from prism.pipeline.noise import entropy_seeded_generator, fill_from_os_entropy

MT_MULTIPLIER = 1812433253  # MT19937's seeding recurrence: w[i] = M (w[i-1] ^ (w[i-1] >> 30)) + i


def _mt_words(generator):
    state = generator.get_state()
    return state[24:24 + 8 * 624].view(624, 8)[:, :4].contiguous().view(torch.int32).flatten().tolist()


def test_the_whole_mersenne_twister_state_comes_from_os_entropy():
    # why: manual_seed keeps 32 bits of the seed, so a seed of any size gives one of 2^32 streams
    first, second = torch.Generator().manual_seed(5), torch.Generator().manual_seed(2 ** 32 + 5)
    assert torch.equal(torch.randn(8, generator=first), torch.randn(8, generator=second))
    generator = fill_from_os_entropy(torch.Generator())
    words = [w % 2 ** 32 for w in _mt_words(generator)]
    seeded = (MT_MULTIPLIER * (words[0] ^ (words[0] >> 30)) + 1) % 2 ** 32
    assert words[1] != seeded  # not a state that manual_seed could have produced
    draws = torch.randn(200_000, generator=generator)
    assert abs(draws.mean()) < 0.02 and abs(draws.std() - 1) < 0.02
    other = entropy_seeded_generator()
    assert not torch.equal(torch.randn(8, generator=fill_from_os_entropy(generator)), torch.randn(8, generator=other))


def _noise_only_optimizer(generator):
    """Naive DP-SGD with lr 1 on an empty batch: each step moves the factors by exactly -noise."""
    model = tiny_model("bert", r=2, hidden=64, dtype=torch.float64, init=True)  # ~1,200 noised coordinates
    optimizer = NaiveDPLoRA(model, lr=1.0, noise_multiplier=2.0, max_grad_norm=1.5, expected_batch_size=3.0,
                            adaptive=False, generator=generator)
    return model, optimizer


def _step_noise(model, optimizer):
    before = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
    optimizer.step()
    return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, optimizer.param_groups[0]["params"])])


@pytest.mark.parametrize("secure", [True, False])
def test_each_step_draws_from_a_state_nobody_kept(secure):
    model, optimizer = _noise_only_optimizer("secure" if secure else torch.Generator().manual_seed(0))
    _step_noise(model, optimizer)
    twin = torch.Generator()
    twin.set_state(optimizer.generator.get_state())  # the state after step 1, as a checkpoint would hold it
    noise = _step_noise(model, optimizer)
    std = optimizer.noise_std
    replay = torch.cat([std * torch.randn(p.shape, generator=twin, dtype=p.dtype).flatten()
                        for p in optimizer.param_groups[0]["params"]])
    # the same values (drawn in the optimizer's own order) exactly when the state was the kept one
    assert torch.allclose(noise.sort().values, replay.sort().values) is not secure
    assert abs(noise.std().item() / std - 1) < 0.1  # still N(0, std^2) per coordinate (5 standard errors)


def test_secure_checkpoints_hold_no_noise_state():
    model, optimizer = _noise_only_optimizer("secure")
    _step_noise(model, optimizer)
    saved = copy.deepcopy(optimizer.state_dict())
    assert saved["prism"]["generator_state"] is None
    other_model, resumed = _noise_only_optimizer("secure")
    resumed.load_state_dict(saved)
    assert resumed.steps_taken == 1 and resumed.secure_noise
    _, plain = _noise_only_optimizer(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="generator='secure'"):
        plain.load_state_dict(saved)
    with pytest.raises(ValueError, match="'secure'"):
        _noise_only_optimizer("urandom")
