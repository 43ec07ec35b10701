"""The per-example hot path through prism's compiled ops (csrc/, `torch.ops.prism`) or their reference.

Two ops, each with a pure-PyTorch reference that is both its specification and its fallback:

    lora_tangent_blocks(x, h, go, R_B_inv, Q_A, Q_B) -> (Y, W, sqnorms)             (docs/method.md 3.1)
        Y_i = go_i^T (h_i R_B_inv)  (m, r),   W_i = x_i^T (go_i Q_A)  (n, r),
        sqnorms_i = max(0, ||Y_i||^2 + ||W_i||^2 - ||Q_B^T W_i||^2)
        reference: pipeline.per_example.tangent_blocks and tangent_sqnorms
    clipped_sum(alpha, per_example) -> sum_i alpha_i per_example_i                   (docs/method.md 3.2)
        examples with alpha_i = 0 contribute exactly 0, even if their tensors hold inf/NaN;
        reference: pipeline.clip.clipped_sum

The CPU op reads x, h, go through their strides, in their own dtype (bfloat16 and float16 are
accumulated in float32) and fuses the products with the norms; the CUDA op does the products with
cuBLAS (bfloat16 / float16 inputs converted to float32 first) and the norms in its own kernels.
Neither allocates an (m, n) tensor: extra memory is O(b r (m + n)) (plus, on CUDA, float32 copies
of bfloat16 inputs).

`backend(device)` tells which implementation runs on a device: "cpp" (the CPU extension), "cuda"
(its CUDA kernels) or "reference". The reference runs where the extension is not built (a
warning says so, once), on devices it has no kernels for, with `PRISM_KERNELS=reference` in the
environment, and inside `with prism.kernels.use("reference"):`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from . import _validate
from ._torch_compat import has_kernel
from .manifold import TangentBasis
from .pipeline import per_example
from .pipeline.clip import clipped_sum as reference_clipped_sum

_MODES = ("auto", "reference")
_DISPATCH_KEYS = {"cpu": ("CPU", "cpp"), "cuda": ("CUDA", "cuda")}
_mode: str | None = None  # set by use(); None: the PRISM_KERNELS environment variable, else "auto"
_loaded: bool | None = None  # whether prism._C is loaded; None: not tried yet


def backend(device: torch.device | str = "cpu") -> str:
    """The implementation the ops run on `device`: "cpp", "cuda" or "reference"."""
    if _current_mode() == "reference" or not _load_extension():
        return "reference"
    return _compiled_backend(torch.device(device).type)


@contextlib.contextmanager
def use(mode: str) -> Iterator[None]:
    """Within the block, run "reference" (pure PyTorch) or "auto" (compiled where available)."""
    _validate.one_of(_MODES, mode=mode)
    global _mode
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def tangent_blocks(x: Tensor, h: Tensor, go: Tensor, basis: TangentBasis, grad_scale: float | Tensor = 1
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Y (b, m, r), W (b, n, r) and squared tangent norms (b,) of each example's gradient of
    grad_scale * loss (docs/method.md 3.1), in the basis' dtype.

    Args:
        x: (b, T, n) lora_A input; h: (b, T, r) its output; go: (b, T, m) gradient at lora_B's
            output; in the model's dtype (any strides).
        basis: tangent_basis of the current factors (fp32, or fp64 for fp64 models).
        grad_scale: multiplies go (a number or a 0-d tensor; b for a loss that is the mean over
            the micro-batch). The compiled op gets it folded into R_B_inv and Q_A instead (Y and
            W are linear in each).
    """
    dtype = basis.Q_A.dtype
    if backend(x.device) == "reference":
        Y, W = per_example.tangent_blocks(*per_example.in_compute_dtype(dtype, x, h, go, grad_scale=grad_scale), basis)
        return Y, W, per_example.tangent_sqnorms(Y, W, basis)
    native = {dtype, torch.bfloat16, torch.float16} if dtype == torch.float32 else {dtype}
    if not (x.dtype == h.dtype == go.dtype and x.dtype in native):  # e.g. autocast's mixed dtypes
        x, h, go = per_example.in_compute_dtype(dtype, x, h, go)
    R_B_inv, Q_A = basis.R_B_inv, basis.Q_A
    if isinstance(grad_scale, Tensor) or grad_scale != 1:
        R_B_inv, Q_A = R_B_inv * grad_scale, Q_A * grad_scale
    return torch.ops.prism.lora_tangent_blocks(x, h, go, R_B_inv, Q_A, basis.Q_B)


def clipped_sum(alpha: Tensor, finite: Tensor, per_example_tensor: Tensor) -> Tensor:
    """sum_i alpha_i t_i over the leading axis; examples with finite_i False contribute exactly 0."""
    if backend(per_example_tensor.device) == "reference" or per_example_tensor.dtype not in (torch.float32,
                                                                                              torch.float64):
        return reference_clipped_sum(alpha, finite, per_example_tensor)
    alpha = torch.where(finite, alpha, 0).to(per_example_tensor.dtype)
    return torch.ops.prism.clipped_sum(alpha, per_example_tensor)


@functools.cache
def _compiled_backend(device_type: str) -> str:
    key, name = _DISPATCH_KEYS.get(device_type, (None, "reference"))
    if key is not None and has_kernel("prism::lora_tangent_blocks", key):
        return name
    return "reference"


def _current_mode() -> str:
    mode = _mode if _mode is not None else os.environ.get("PRISM_KERNELS", "auto")
    _validate.one_of(_MODES, PRISM_KERNELS=mode)
    return mode


def _load_extension() -> bool:
    """Load prism._C (registering torch.ops.prism) on first use; warn once if it is missing."""
    global _loaded
    if _loaded is None:
        try:
            from . import _C  # noqa: F401
        except ImportError as exc:
            _loaded = False
            warnings.warn(f"prism's compiled kernels are not available ({exc}); running the pure-PyTorch reference "
                          "kernels. Build them with `pip install --no-build-isolation -e .`.", RuntimeWarning,
                          stacklevel=3)
        else:
            _loaded = True
            _register_fakes()
    return _loaded


def _register_fakes() -> None:
    """Shapes and dtypes of the ops' outputs, for FakeTensor / torch.compile."""

    @torch.library.register_fake("prism::lora_tangent_blocks")
    def _(x, h, go, R_B_inv, Q_A, Q_B):
        b, n, m, r = x.shape[0], x.shape[2], go.shape[2], h.shape[2]
        return Q_A.new_empty(b, m, r), Q_A.new_empty(b, n, r), Q_A.new_empty(b)

    @torch.library.register_fake("prism::clipped_sum")
    def _(alpha, per_example):
        return per_example.new_empty(per_example.shape[1:])
