"""Compiled ops (torch.ops.prism) == a float64 reference on fresh random inputs; backend selection."""

import os
import sys
import warnings

import pytest
import torch

import prism
from helpers import make_batch, per_example_losses, tiny_model
from prism import PRISM, kernels
from prism.pipeline import per_example
from prism.manifold import TangentBasis, tangent_basis

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available() or kernels.backend("cuda") != "cuda", reason="no GPU or no CUDA kernels"))]
# (b, T, m, n, r): T = 1, r = 1, r = 64, odd sizes, b = 0 (an empty Poisson batch)
SHAPES = [(3, 1, 5, 7, 1), (2, 9, 96, 80, 64), (5, 13, 37, 41, 3), (4, 33, 70, 50, 16), (1, 50, 200, 300, 8),
          (0, 7, 11, 13, 4)]
# relative error allowed against float64, by input dtype (bfloat16/float16 accumulate in float32)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def _compiled():
    if kernels.backend("cpu") == "reference":
        pytest.skip("prism's compiled kernels are not built")


def sample_inputs(b, T, m, n, r, dtype, device, seed=0, contiguous=True):
    """x (b, T, n), h (b, T, r), go (b, T, m) in `dtype` and a basis in its compute dtype; with
    contiguous=False, x is a transposed view, go a strided slice and h an expanded view."""
    g = torch.Generator().manual_seed(seed)
    basis_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    A, B = torch.randn(m, r, generator=g), torch.randn(n, r, generator=g)
    basis = TangentBasis(*(t.to(device, basis_dtype) for t in tangent_basis(A.double(), B.double())))
    x = torch.randn(b, T, n, generator=g)
    go = torch.randn(b, T, m, generator=g) * 3
    h = x @ B + 0.1 * torch.randn(b, T, r, generator=g)
    x, h, go = (t.to(device, dtype) for t in (x, h, go))
    if not contiguous:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        go = torch.stack([go, go], 3).flatten(2)[:, :, ::2]
        h = h[:, :1].expand(b, T, r) if T > 0 and b > 0 else h
        assert b == 0 or not go.is_contiguous()
    return [x, h, go, basis]


def reference(x, h, go, basis):
    """Y, W, squared norms in float64 from the same (rounded) inputs."""
    x, h, go = (t.double() for t in (x, h, go))
    basis = TangentBasis(*(t.double() for t in basis))
    Y, W = per_example.tangent_blocks(x, h, go, basis)
    return Y, W, per_example.tangent_sqnorms(Y, W, basis)


def assert_relative(got, ref, tol):
    assert got.shape == ref.shape
    if ref.numel():
        error = ((got.double() - ref).norm() / ref.norm()).item()
        assert error < tol, f"relative error {error:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_tangent_blocks_match_float64(device, dtype, shape, contiguous):
    x, h, go, basis = sample_inputs(*shape, dtype, device, seed=sum(shape), contiguous=contiguous)
    Y, W, sq = torch.ops.prism.lora_tangent_blocks(x, h, go, basis.R_B_inv, basis.Q_A, basis.Q_B)
    assert Y.dtype == W.dtype == sq.dtype == basis.Q_A.dtype and Y.device.type == device
    for got, ref in zip((Y, W, sq), reference(x, h, go, basis)):
        assert_relative(got, ref, TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_tangent_blocks_of_a_non_finite_example_stay_in_that_example(device):
    x, h, go, basis = sample_inputs(4, 6, 20, 24, 8, torch.float32, device)
    go[1, 2, 3] = float("nan")
    x[2, 0, 0] = float("inf")
    Y, W, sq = torch.ops.prism.lora_tangent_blocks(x, h, go, basis.R_B_inv, basis.Q_A, basis.Q_B)
    assert torch.isfinite(sq).tolist() == [True, False, False, True]
    for got, ref in zip((Y, W, sq), reference(x, h, go, basis)):
        assert_relative(got[[0, 3]], ref[[0, 3]], 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 4), (0, 6, 2), (9, 130, 8)])
def test_clipped_sum_matches_float64_and_skips_zero_weights(device, dtype, shape):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(*shape, generator=g, dtype=dtype).to(device)
    alpha = torch.rand(shape[0], generator=g, dtype=dtype).to(device)
    if shape[0] > 1:
        t[1] = float("nan")
        alpha[1] = 0
    got = torch.ops.prism.clipped_sum(alpha, t)
    keep = alpha != 0
    ref = torch.einsum("b,b...->...", alpha[keep].double(), t[keep].double())
    assert got.dtype == dtype and got.shape == t.shape[1:]
    torch.testing.assert_close(got.double(), ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    strided = torch.ops.prism.clipped_sum(alpha, t.transpose(0, -1).contiguous().transpose(0, -1))
    torch.testing.assert_close(strided, got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(device, dtype):
    x, h, go, basis = sample_inputs(3, 5, 12, 10, 4, dtype, device)
    torch.library.opcheck(torch.ops.prism.lora_tangent_blocks.default,
                          (x, h, go, basis.R_B_inv, basis.Q_A, basis.Q_B))
    per_example_tensor = torch.randn(3, 10, 4, dtype=basis.Q_A.dtype, device=device)
    alpha = torch.rand(3, dtype=basis.Q_A.dtype, device=device)
    torch.library.opcheck(torch.ops.prism.clipped_sum.default, (alpha, per_example_tensor))


def test_bad_inputs_are_refused_with_the_op_name():
    x, h, go, basis = sample_inputs(2, 3, 8, 6, 2, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="lora_tangent_blocks"):
        torch.ops.prism.lora_tangent_blocks(x, h, go[:1], basis.R_B_inv, basis.Q_A, basis.Q_B)
    with pytest.raises(RuntimeError, match="bfloat16/float16 with a float basis"):
        torch.ops.prism.lora_tangent_blocks(x.double(), h.double(), go.double(), basis.R_B_inv, basis.Q_A, basis.Q_B)
    with pytest.raises(RuntimeError, match="clipped_sum"):
        torch.ops.prism.clipped_sum(torch.ones(3), torch.ones(2, 4))


def test_the_compiled_backend_is_in_use_where_required():
    """CI sets PRISM_REQUIRE_EXTENSION=1: a silent fall-back to the reference would fail here."""
    if os.environ.get("PRISM_REQUIRE_EXTENSION") != "1":
        pytest.skip("PRISM_REQUIRE_EXTENSION is not set")
    assert kernels.backend("cpu") == "cpp"
    assert kernels.backend() == "cpp"


def test_reference_is_selected_by_context_and_environment(monkeypatch):
    with kernels.use("reference"):
        assert kernels.backend("cpu") == "reference"
    assert kernels.backend("cpu") == "cpp"
    assert kernels.backend("meta") == "reference"
    monkeypatch.setenv("PRISM_KERNELS", "reference")
    assert kernels.backend("cpu") == "reference"
    with kernels.use("auto"):
        assert kernels.backend("cpu") == "cpp"
    monkeypatch.setenv("PRISM_KERNELS", "fast")
    with pytest.raises(ValueError, match="PRISM_KERNELS"):
        kernels.backend()


def test_a_missing_extension_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.delattr(prism, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "prism._C", None)  # import prism._C now raises ImportError
    with pytest.warns(RuntimeWarning, match="pure-PyTorch reference"):
        assert kernels.backend("cpu") == "reference"
    x, h, go, basis = sample_inputs(2, 3, 8, 6, 2, torch.float32, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Y, W, sq = kernels.tangent_blocks(x, h, go, basis)
    for got, ref in zip((Y, W, sq), reference(x, h, go, basis)):
        assert_relative(got, ref, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_prism_step_is_the_same_on_both_backends(dtype, reduction):
    """Norms, clipped sums and the updated factors agree, whichever kernels computed them."""
    results = []
    for mode in ("reference", "auto"):
        model = tiny_model("llama", r=4, dtype=dtype)
        opt = PRISM(model, lr=0.05, noise_multiplier=1.0, max_grad_norm=0.5, expected_batch_size=4,
                    loss_reduction=reduction, generator=torch.Generator().manual_seed(3))
        with kernels.use(mode):
            losses = per_example_losses("llama", model, make_batch("llama", b=4, seed=5))
            (losses.mean() if reduction == "mean" else losses.sum()).backward()
            norms = opt.stats.last_norms.clone()
            sums = [s for module_sums in opt.clipped_sums().values() for s in module_sums]
            opt.step()
        factors = [p.detach().clone() for pair in opt.pairs for p in (pair.lora_A.weight, pair.lora_B.weight)]
        results.append([norms, *sums, *factors])
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
