"""The fused SwiGLU (kernels/swiglu.py) against a float64 reference: values and input gradients,
fp32 and bf16, odd/non-power-of-two widths, 1-/2-/3-D leading shapes and strided inputs, for the
Triton kernels (interpreter on CPU, compiled on GPU) and the torch path; the torch path is
megatron's eager glu op for op. The GPU tests run the real width (2F = 22016) and a row count
whose element offsets pass 2**31."""

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.triton_mode import (
    DEVICE,
    ON_GPU,
    import_kernels,
    interpreted,
    triton_interpreter,  # noqa: F401 (autouse: the interpreter while each test runs)
)

# the interpreter on machines without CUDA (tests/kernels/triton_mode.py says why it is done so)
(st,) = import_kernels("megatron_hybrid.kernels.swiglu_triton")
from megatron_hybrid.kernels.swiglu import swiglu, swiglu_torch  # noqa: E402

TRITON_OK = ON_GPU or interpreted(st._swiglu_fwd_kernel)
BACKENDS = ["torch"] + (["triton"] if TRITON_OK else [])


def reference(x, dy):
    """(y, dx) of silu(gate) * linear by autograd in float64 on x's values."""
    x64 = x.detach().double().requires_grad_(True)
    g, u = x64.chunk(2, dim=-1)
    y = g * torch.sigmoid(g) * u
    y.backward(dy.double())
    return y.detach(), x64.grad


def ours(x, dy, backend):
    leaf = x.detach().clone().requires_grad_(True)
    y = swiglu(leaf, backend=backend)
    y.backward(dy)
    return y, leaf.grad


def rel(a, b):
    a, b = a.double(), b.double()
    ref = b.norm()
    return (a - b).norm().item() if ref == 0 else ((a - b).norm() / ref).item()


# relative L2 error bounds: fp32 is exact up to float32 arithmetic; bf16 output/gradient carry one
# bf16 rounding (Triton, float32 inside) or a few (the torch path computes in bf16, as megatron).
# Triton's CPU interpreter truncates float32 -> bf16 (the compiled kernel rounds to nearest), so
# there the kernel's bf16 error is ~3.3e-3 instead of ~1.6e-3 (see the GPU test's bound).
TOL = {
    ("triton", torch.float32): 1e-6,
    ("torch", torch.float32): 1e-6,
    ("triton", torch.bfloat16): 5e-3,
    ("torch", torch.bfloat16): 1.5e-2,
}


def make(lead, f, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, 2 * f, generator=g) * 3).to(DEVICE, dtype)
    dy = torch.randn(*lead, f, generator=g).to(DEVICE, dtype)
    return x, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("f", [1, 3, 64, 100, 257])
@pytest.mark.parametrize("lead", [(5,), (3, 2)], ids=["2d", "3d"])  # [N, 2F] and [s, b, 2F]
def test_matches_float64_reference(backend, dtype, f, lead):
    x, dy = make(lead, f, dtype, seed=f)
    y, dx = ours(x, dy, backend)
    ry, rdx = reference(x, dy)
    assert y.shape == (*lead, f) and y.dtype == dtype
    assert dx.shape == x.shape and dx.dtype == dtype
    tol = TOL[(backend, dtype)]
    assert rel(y, ry) < tol, rel(y, ry)
    assert rel(dx, rdx) < tol, rel(dx, rdx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_is_megatrons_eager_glu(dtype):
    """backend="torch" is op for op megatron-core's MLP glu (F.silu, no clamp/offset): bitwise,
    values and gradients, in the input dtype."""
    x, dy = make((4, 2), 37, dtype, seed=3)

    def megatron_glu(t):  # megatron/core/transformer/mlp.py, MLP.forward, gated_linear_unit
        x_glu, x_linear = torch.chunk(t, 2, dim=-1)
        return F.silu(x_glu) * (x_linear + 0.0)

    y, dx = ours(x, dy, "torch")
    leaf = x.detach().clone().requires_grad_(True)
    ry = megatron_glu(leaf)
    ry.backward(dy)
    assert torch.equal(y, ry) and torch.equal(dx, leaf.grad)
    assert torch.equal(swiglu_torch(x), ry)


@pytest.mark.skipif(not TRITON_OK, reason="Triton unavailable")
def test_triton_matches_torch_fp32():
    x, dy = make((6,), 130, torch.float32, seed=4)
    y1, dx1 = ours(x, dy, "triton")
    y2, dx2 = ours(x, dy, "torch")
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx1, dx2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_gradients(backend):
    """A column slice of a wider tensor (row stride > 2F: read in place), a transposed
    [b, s] -> [s, b] layout (leading dims that do not collapse: copied), and a non-contiguous /
    broadcast output gradient give the same result as contiguous tensors."""
    f = 19
    x, dy = make((3, 4), f, torch.float32, seed=5)
    # Triton: the same program per element, bitwise; torch: its CPU kernels may pick another
    # (vectorised or not) loop for strided operands
    tol = dict(rtol=0, atol=0) if backend == "triton" else dict(rtol=1e-6, atol=1e-7)
    want_y, want_dx = ours(x, dy, backend)

    wide = torch.randn(3, 4, 2 * f + 7, device=DEVICE)
    wide[..., : 2 * f] = x
    leaf = wide.clone().requires_grad_(True)
    view = leaf[..., : 2 * f]
    assert not view.is_contiguous()
    y = swiglu(view, backend=backend)
    y.backward(dy)
    torch.testing.assert_close(y, want_y, **tol)
    torch.testing.assert_close(leaf.grad[..., : 2 * f], want_dx, **tol)
    assert (leaf.grad[..., 2 * f :] == 0).all()

    leaf = x.transpose(0, 1).contiguous().requires_grad_(True)  # [4, 3, 2F]
    y = swiglu(leaf.transpose(0, 1), backend=backend)  # [3, 4, 2F], strided
    y.backward(dy.transpose(0, 1).contiguous().transpose(0, 1))  # strided gradient too
    torch.testing.assert_close(y, want_y, **tol)
    torch.testing.assert_close(leaf.grad.transpose(0, 1), want_dx, **tol)

    # sum() hands back an expanded (all strides 0) gradient of ones
    leaf = x.clone().requires_grad_(True)
    swiglu(leaf, backend=backend).sum().backward()
    _, ref_dx = ours(x, torch.ones_like(dy), backend)
    torch.testing.assert_close(leaf.grad, ref_dx, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_values_and_empty(backend):
    """Large |gate| (sigmoid saturating to 0/1) stays finite and exact in the limits; zero rows
    work; an odd last dim and an unknown backend are refused."""
    x = torch.tensor([[-100.0, -20.0, 0.0, 20.0, 100.0, 2.0, 3.0, -1.0, 0.5, 4.0]], device=DEVICE)
    dy = torch.ones(1, 5, device=DEVICE)
    y, dx = ours(x, dy, backend)
    ry, rdx = reference(x, dy)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(y.double(), ry, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-6, atol=1e-6)

    x = torch.empty(0, 3, 8, device=DEVICE, requires_grad=True)
    y = swiglu(x, backend=backend)
    assert y.shape == (0, 3, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu(torch.zeros(2, 5, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="unknown swiglu backend"):
        swiglu(torch.zeros(2, 4, device=DEVICE), backend="cuda")


# ---- GPU ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_gpu_real_width_bf16():
    """7B width per TP rank (F = 11008), 8192 rows, bf16: the fp64 reference, and the eager
    torch path (bf16 arithmetic, more roundings) no closer to it than the kernel."""
    x, dy = make((8192,), 11008, torch.bfloat16, seed=11)
    y, dx = ours(x, dy, "triton")
    ry, rdx = reference(x, dy)
    # one round-to-nearest bf16 rounding of uniform-ish data: ~1.6e-3 (truncation would be ~3.3e-3)
    assert rel(y, ry) < 2.5e-3 and rel(dx, rdx) < 2.5e-3, (rel(y, ry), rel(dx, rdx))
    ty, tdx = ours(x, dy, "torch")
    assert rel(y, ry) <= rel(ty, ry) * 1.05 and rel(dx, rdx) <= rel(tdx, rdx) * 1.05
    # TP 2's half width and the 3-D [s, b, 2F] layout the MLP passes
    x3, dy3 = make((1024, 2), 5504, torch.bfloat16, seed=12)
    y3, dx3 = ours(x3, dy3, "auto")
    ry3, rdx3 = reference(x3, dy3)
    assert rel(y3, ry3) < 5e-3 and rel(dx3, rdx3) < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_gpu_int64_offsets():
    """Rows past 2**31 elements (x is ~4.3 GB in bf16): the last rows are right, i.e. the row
    offsets do not wrap around in int32."""
    two_f = 22016
    n = 2**31 // two_f + 64
    if torch.cuda.mem_get_info()[0] < 20 * n * two_f:  # x, y, dy, dx and the checks
        pytest.skip("not enough free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(13)
    x = torch.randn(n, two_f, device="cuda", generator=g).to(torch.bfloat16)
    leaf = x.requires_grad_(True)
    y = swiglu(leaf, backend="triton")
    tail = slice(n - 128, n)
    dy = torch.zeros_like(y)
    dy[tail] = torch.randn(128, two_f // 2, device="cuda", generator=g).to(torch.bfloat16)
    y.backward(dy)
    ry, rdx = reference(x[tail], dy[tail])
    assert rel(y[tail], ry) < 5e-3 and rel(leaf.grad[tail], rdx) < 5e-3
    assert (leaf.grad[: n - 128] == 0).all()
