"""Every private PyTorch API prism relies on, in one place.

torch offers no public way to do these four things, and each may change in a release. Each is
used only through this module and covered by tests/test_torch_compat.py, which fails loudly
(naming the function) when the installed torch no longer behaves as assumed here.

| function                | private torch API                                    | used by                 |
|-------------------------|------------------------------------------------------|-------------------------|
| queue_end_of_backward   | torch.autograd.Variable._execution_engine.queue_callback | the clip stage (one clip per backward pass) |
| current_backward_pass   | torch._C._current_graph_task_id                      | collect (keeps passes apart) |
| refill_cpu_generator    | the byte layout of torch's CPU generator state (MT19937) | secure noise        |
| has_kernel              | torch._C._dispatch_has_kernel_for_dispatch_key       | kernels (which backend runs) |
"""

from __future__ import annotations

from typing import Callable

import torch

NOT_IN_BACKWARD = -1


def queue_end_of_backward(callback: Callable[[], None]) -> None:
    """Run `callback` once the backward pass in progress has finished (every gradient computed
    and accumulated). Must be called from inside a backward pass (e.g. from a tensor hook)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def current_backward_pass() -> int:
    """An id of the backward pass (autograd graph task) running now, NOT_IN_BACKWARD (-1) outside one."""
    return torch._C._current_graph_task_id()


_MT_WORDS = 624  # MT19937's state: 624 32-bit words
_MT_OFFSET = 24  # bytes before them in torch's CPU state: initial seed (u64), left (i32), seeded (i32), next (u64)
_CPU_STATE_BYTES = 5056


def refill_cpu_generator(generator: torch.Generator, random_bytes: Callable[[int], bytes]) -> torch.Generator:
    """Overwrite all 624 MT19937 state words of a CPU generator with `random_bytes(2496)`.

    `manual_seed` keeps only 32 bits of a seed; this sets the whole 19,968-bit state instead.

    Raises:
        RuntimeError: torch stores the CPU generator state in a layout this function does not know.
    """
    generator.manual_seed(1)  # a known state to overwrite: MT19937 words 1, 1812433254, ..., no cached normal
    state = generator.get_state()
    words = state[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS].view(_MT_WORDS, 8)  # little-endian u64, high half 0
    if state.numel() != _CPU_STATE_BYTES or words[:2, :4].contiguous().view(torch.int32).flatten().tolist() != [
            1, 1812433254]:
        raise RuntimeError(f"torch {torch.__version__} stores the CPU generator state in a layout prism does not "
                           "know (prism._torch_compat.refill_cpu_generator); secure noise cannot refill it.")
    fresh = torch.frombuffer(bytearray(random_bytes(4 * _MT_WORDS)), dtype=torch.uint8)
    words[:, :4] = fresh.view(_MT_WORDS, 4)
    generator.set_state(state)
    return generator


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the registered operator `op` (e.g. "prism::clipped_sum") has a kernel for `dispatch_key`."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)
