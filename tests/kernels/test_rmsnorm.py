"""The full-width QK RMSNorm (kernels/rmsnorm.py) against a float64 reference: values and the x and
weight gradients, fp32 and bf16 inputs with bf16 and fp32 weights, odd widths, 2-D and 3-D
leading shapes, for the Triton kernels (interpreter on CPU, compiled on GPU) and the torch path;
tensor parallelism emulated in one process (two ranks in two threads with a summing fake
collective) against the unsplit norm; what the Triton path saves for the backward; strided
inputs. The GPU tests run the 7B width (8192 x 3840 bf16) and row offsets past 2**31."""

import threading

import pytest
import torch

from tests.kernels.triton_mode import (
    DEVICE,
    ON_GPU,
    import_kernels,
    interpreted,
    triton_interpreter,  # noqa: F401 (autouse: the interpreter while each test runs)
)

# the interpreter on machines without CUDA (tests/kernels/triton_mode.py says why it is done so)
(rt,) = import_kernels("megatron_hybrid.kernels.rmsnorm_triton")
from megatron_hybrid.kernels.rmsnorm import tp_rmsnorm, tp_rmsnorm_torch  # noqa: E402

TRITON_OK = ON_GPU or interpreted(rt._norm_fwd_kernel)
BACKENDS = ["torch"] + (["triton"] if TRITON_OK else [])
EPS = 1e-6


def reference(x, w, dy, width):
    """(y, dx, dw) by autograd in float64 on the inputs' values. ``dx`` is returned with the
    norm of its first term ``r * dy * w`` as a floor of its error scale: the two terms cancel
    when a row is short (n = 1: dx ~ 0)."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    r = torch.rsqrt(x64.pow(2).sum(-1, keepdim=True) / width + EPS)
    y = w64 * (x64 * r)
    y.backward(dy.double())
    scale = (r * dy.double() * w64).detach().norm().item()
    return y.detach(), Scaled(x64.grad, scale), w64.grad


class Scaled:
    def __init__(self, t, scale):
        self.t, self.scale = t, scale


def ours(x, w, dy, backend, width=None, all_reduce=None):
    xl = x.detach().clone().requires_grad_(True)
    wl = w.detach().clone().requires_grad_(True)
    y = tp_rmsnorm(xl, wl, EPS, width or x.shape[-1], all_reduce, backend=backend)
    y.backward(dy)
    return y, xl.grad, wl.grad


def rel(a, b):
    """Relative L2 error of ``a`` from ``b`` (a :class:`Scaled` reference: over its floor too)."""
    floor = 0.0
    if isinstance(b, Scaled):
        b, floor = b.t, b.scale
    a, b = a.double(), b.double()
    ref = max(b.norm().item(), floor)
    return (a - b).norm().item() if ref == 0 else (a - b).norm().item() / ref


def make(lead, n, dtype, wdtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, n, generator=g) * 3).to(DEVICE, dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(DEVICE, wdtype)
    dy = torch.randn(*lead, n, generator=g).to(DEVICE, dtype)
    return x, w, dy


def tol(dtype):
    # fp32: float32 arithmetic; bf16: one rounding of the result (Triton's CPU interpreter
    # truncates float32 -> bf16, the compiled kernel and torch round to nearest)
    return 2e-6 if dtype == torch.float32 else 8e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["x32", "x16"])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32], ids=["w16", "w32"])
@pytest.mark.parametrize("n", [1, 7, 64, 100, 384])
@pytest.mark.parametrize("lead", [(5,), (3, 2)], ids=["2d", "3d"])
def test_matches_float64_reference(backend, dtype, wdtype, n, lead):
    x, w, dy = make(lead, n, dtype, wdtype, seed=n)
    y, dx, dw = ours(x, w, dy, backend)
    ry, rdx, rdw = reference(x, w, dy, n)
    assert y.shape == x.shape and y.dtype == dtype
    assert dx.shape == x.shape and dx.dtype == dtype
    assert dw.shape == w.shape and dw.dtype == wdtype
    assert rel(y, ry) < tol(dtype), rel(y, ry)
    assert rel(dx, rdx) < tol(dtype), rel(dx, rdx)
    assert rel(dw, rdw) < tol(wdtype if dtype == torch.float32 else dtype), rel(dw, rdw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_is_the_eager_norm(dtype):
    """backend="torch" is TPFullWidthRMSNorm's eager forward from before the kernel: bitwise."""
    x, w, dy = make((4, 3), 24, dtype, torch.bfloat16, seed=1)

    def eager(x, w):
        x32 = x.float()
        sum_sq = x32.pow(2).sum(-1, keepdim=True)
        return (w * (x32 * torch.rsqrt(sum_sq / 48 + EPS))).to(x.dtype)

    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ry = eager(xl, wl)
    ry.backward(dy)
    y, dx, dw = ours(x, w, dy, "torch", width=48)
    assert torch.equal(y, ry) and torch.equal(dx, xl.grad) and torch.equal(dw, wl.grad)
    assert torch.equal(tp_rmsnorm_torch(x, w, EPS, 48), ry)


class _FakeTP:
    """A sum over ``world`` ranks running in threads of this process. One lock keeps one rank
    running at a time (Triton's interpreter is not thread-safe); a rank lets go of it only while
    it waits for the others in a collective. Partials are summed in rank order."""

    def __init__(self, world):
        self.world, self.lock = world, threading.Lock()
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots, self.calls = {}, [0] * world

    def exchange(self, rank, t):
        key = self.calls[rank]
        self.calls[rank] += 1
        self.slots[key, rank] = t.detach().clone()
        self.lock.release()
        try:
            self.barrier.wait()
        finally:
            self.lock.acquire()
        total = sum(self.slots[key, r] for r in range(self.world))
        return total.to(t.dtype)

    def all_reduce(self, rank):
        tp = self

        class _Sum(torch.autograd.Function):  # all_reduce_sum's autograd: sum both ways
            @staticmethod
            def forward(ctx, t):
                return tp.exchange(rank, t)

            @staticmethod
            def backward(ctx, g):
                return tp.exchange(rank, g)

        return _Sum.apply

    def run(self, fn):
        out, errors = [None] * self.world, []

        def body(rank):
            with self.lock:
                try:
                    out[rank] = fn(rank)
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    errors.append(e)
                    self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_parallel_equals_unsplit(backend, dtype):
    """Two ranks, each with half of every row and half of the weight, summing the statistics
    through a collective: the concatenated y, dx and dweight equal the unsplit norm's (up to the
    order of the fp32 sums), with one all-reduce forward and one backward per rank."""
    n = 100
    x, w, dy = make((3, 4), 2 * n, dtype, torch.float32, seed=7)
    want = ours(x, w, dy, backend)
    tp = _FakeTP(2)

    def rank(r):
        cols = slice(r * n, (r + 1) * n)
        return ours(x[..., cols], w[cols], dy[..., cols], backend, 2 * n, tp.all_reduce(r))

    parts = tp.run(rank)
    assert tp.calls == [2, 2]
    got = [torch.cat([p[i] for p in parts], dim=-1) for i in range(3)]
    for g, ref in zip(got, want):
        assert rel(g, ref) < (1e-6 if dtype == torch.float32 else 8e-3), rel(g, ref)
    ry, rdx, rdw = reference(x, w, dy, 2 * n)
    assert rel(got[0], ry) < tol(dtype) and rel(got[1], rdx) < tol(dtype)


@pytest.mark.skipif(not TRITON_OK, reason="Triton unavailable")
def test_triton_saves_only_input_weight_and_rstd():
    """The backward keeps x (in its dtype, read in place from a strided q-like view of a wider
    qkv row), the weight and one fp32 r per row: no fp32 [rows, n] tensor."""
    rows, n = 6, 40
    qkv = torch.randn(rows, 3 * n, device=DEVICE, dtype=torch.bfloat16)
    leaf = qkv.clone().requires_grad_(True)
    x = leaf[:, :n]
    w = torch.ones(n, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = tp_rmsnorm(x, w, EPS, n, backend="triton")
    assert len(saved) == 3, [(t.shape, t.dtype) for t in saved]
    xs, ws, r = saved
    assert xs.dtype == torch.bfloat16 and xs.untyped_storage().data_ptr() == leaf.data_ptr()
    assert ws.data_ptr() == w.data_ptr()
    assert r.dtype == torch.float32 and r.shape == (rows,)
    y.sum().backward()
    assert leaf.grad[:, n:].eq(0).all() and leaf.grad[:, :n].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """A column slice of a wider row (read in place), a [b, s] -> [s, b] transposed layout
    (copied) and an expanded output gradient give the contiguous tensors' results."""
    n = 37
    x, w, dy = make((3, 4), n, torch.float32, torch.float32, seed=5)
    # Triton: the same programs see the same values, bitwise; torch's CPU loops may differ
    exact = dict(rtol=0, atol=0) if backend == "triton" else dict(rtol=2e-6, atol=1e-6)
    want = ours(x, w, dy, backend)

    wide = torch.randn(3, 4, n + 11, device=DEVICE)
    wide[..., :n] = x
    leaf = wide.clone().requires_grad_(True)
    wl = w.clone().requires_grad_(True)
    y = tp_rmsnorm(leaf[..., :n], wl, EPS, n, backend=backend)
    y.backward(dy)
    torch.testing.assert_close(y, want[0], **exact)
    torch.testing.assert_close(leaf.grad[..., :n], want[1], **exact)
    torch.testing.assert_close(wl.grad, want[2], rtol=2e-6, atol=1e-6)  # row blocks differ
    assert (leaf.grad[..., n:] == 0).all()

    leaf = x.transpose(0, 1).contiguous().requires_grad_(True)
    y = tp_rmsnorm(leaf.transpose(0, 1), w, EPS, n, backend=backend)
    y.backward(dy.transpose(0, 1).contiguous().transpose(0, 1))
    torch.testing.assert_close(y, want[0], **exact)
    torch.testing.assert_close(leaf.grad.transpose(0, 1), want[1], **exact)

    leaf = x.clone().requires_grad_(True)
    tp_rmsnorm(leaf, w, EPS, n, backend=backend).sum().backward()
    ref_dx = ours(x, w, torch.ones_like(dy), backend)[1]
    torch.testing.assert_close(leaf.grad, ref_dx, **exact)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_and_bad_arguments(backend):
    x = torch.zeros(0, 3, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE, requires_grad=True)
    y = tp_rmsnorm(x, w, EPS, 8, backend=backend)
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.eq(0).all()
    with pytest.raises(ValueError, match=r"weight \[n\]"):
        tp_rmsnorm(torch.zeros(2, 5, device=DEVICE), w, EPS, 8, backend=backend)
    with pytest.raises(ValueError, match="unknown rmsnorm backend"):
        tp_rmsnorm(torch.zeros(2, 8, device=DEVICE), w, EPS, 8, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_gpu_7b_width(wdtype):
    """8192 tokens x 3840 (q at 7B widths, TP 1), bf16: one bf16 rounding from the float64
    reference, and within bf16 rounding of the eager torch path."""
    x, w, dy = make((8192,), 3840, torch.bfloat16, wdtype, seed=11)
    y, dx, dw = ours(x, w, dy, "triton")
    ry, rdx, rdw = reference(x, w, dy, 3840)
    assert rel(y, ry) < 3e-3 and rel(dx, rdx) < 3e-3, (rel(y, ry), rel(dx, rdx))
    assert rel(dw, rdw) < (3e-3 if wdtype == torch.bfloat16 else 1e-5), rel(dw, rdw)
    ty, tdx, tdw = ours(x, w, dy, "torch")
    assert rel(y, ty) < 5e-3 and rel(dx, tdx) < 5e-3 and rel(dw, tdw) < 5e-3
    # deterministic: the same bits again
    y2, dx2, dw2 = ours(x, w, dy, "triton")
    assert torch.equal(y, y2) and torch.equal(dx, dx2) and torch.equal(dw, dw2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_gpu_row_offsets_past_2_31():
    """Two rows 2**31 + 64 elements apart (a strided view of a 4 GiB buffer): int64 offsets."""
    n, stride = 384, 2**31 + 64
    buf = torch.zeros(stride + n, device="cuda", dtype=torch.bfloat16)
    x, w, dy = make((2,), n, torch.bfloat16, torch.bfloat16, seed=12)
    buf[:n], buf[stride:] = x[0], x[1]
    view = buf.as_strided((2, n), (stride, 1))
    y = tp_rmsnorm(view, w, EPS, n, backend="triton")
    torch.testing.assert_close(y, tp_rmsnorm(x, w, EPS, n, backend="triton"), rtol=0, atol=0)
