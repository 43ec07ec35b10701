"""The private torch APIs prism relies on (prism._torch_compat) still behave as assumed.

A failure here means the installed torch changed one of them: fix prism/_torch_compat.py.
"""

import os

import torch

from prism import _torch_compat as compat


def test_queue_end_of_backward_runs_once_after_every_gradient_has_landed():
    weight = torch.nn.Parameter(torch.ones(3))
    x = torch.ones(3, requires_grad=True)
    events = []

    def on_output_grad(grad):
        compat.queue_end_of_backward(lambda: events.append(("end", weight.grad.clone(), x.grad.clone())))
        events.append("hook")

    y = weight * x
    y.register_hook(on_output_grad)
    (2 * y).sum().backward()
    assert events[0] == "hook" and len(events) == 2, "queue_end_of_backward: the callback did not run exactly once"
    _, weight_grad, x_grad = events[1]
    assert torch.equal(weight_grad, torch.full((3,), 2.0)) and torch.equal(x_grad, torch.full((3,), 2.0)), \
        "queue_end_of_backward: the callback ran before the gradients were accumulated"


def test_current_backward_pass_tells_passes_apart():
    assert compat.current_backward_pass() == compat.NOT_IN_BACKWARD
    seen = []
    x = torch.ones(2, requires_grad=True)
    for _ in range(2):
        a, b = x * 2, x * 3
        a.register_hook(lambda g: seen.append(compat.current_backward_pass()))
        b.register_hook(lambda g: seen.append(compat.current_backward_pass()))
        (a + b).sum().backward()
    assert seen[0] == seen[1] != compat.NOT_IN_BACKWARD, "current_backward_pass: one pass, two ids"
    assert seen[2] == seen[3] != seen[0], "current_backward_pass: two passes, one id"


def test_refill_cpu_generator_sets_the_whole_state_from_the_given_bytes():
    fixed = os.urandom(2496)
    first = compat.refill_cpu_generator(torch.Generator(), lambda n: fixed[:n])
    second = compat.refill_cpu_generator(torch.Generator(), lambda n: fixed[:n])
    third = compat.refill_cpu_generator(torch.Generator(), os.urandom)
    draw = [torch.randn(64, generator=g) for g in (first, second, third)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    state = bytes(first.get_state()[24:24 + 8 * 624].view(624, 8)[:, :4].contiguous().numpy().tobytes())
    seeded = torch.Generator()
    seeded.manual_seed(1)
    # after the draws the state words are MT19937's next ones, not 1, 1812433254, ... (the layout check passed)
    assert state != bytes(seeded.get_state()[24:24 + 8 * 624].view(624, 8)[:, :4].contiguous().numpy().tobytes())


def test_has_kernel_sees_which_dispatch_keys_an_operator_has():
    lib = torch.library.Library("prism_compat_test", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: 2 * x, "CPU")
    assert compat.has_kernel("prism_compat_test::twice", "CPU")
    assert not compat.has_kernel("prism_compat_test::twice", "CUDA")
