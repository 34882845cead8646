"""Triton gated RMSNorm vs the PyTorch reference: through Triton's CPU interpreter on machines
without CUDA, compiled on CUDA tensors otherwise."""

import sys
from pathlib import Path

try:
    import kernels  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.triton_mode import (  # noqa: E402
    DEVICE,
    import_kernels,
    skip_module_unless_interpreted,
    triton_interpreter,  # noqa: F401 (autouse: the interpreter while each test runs)
)

# the interpreter on machines without CUDA (tests/kernels/triton_mode.py says why it is done so)
(gr,) = import_kernels("kernels.gated_rmsnorm")
from kernels.gated_rmsnorm import gated_rmsnorm, gated_rmsnorm_torch  # noqa: E402

skip_module_unless_interpreted(gr._gated_rmsnorm_fwd_kernel, gr.tl.zeros)

TOL = 1e-5  # fp32 relative L2 error (observed ~1e-7)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    ref = b.norm()
    return (a - b).norm().item() if ref == 0 else ((a - b).norm() / ref).item()


def make(lead, V, *, dtype=torch.float32, w_dtype=None, strided_gate=True, seed=0):
    """x [*lead, V]; gate a strided slice of a wider projection (as in the GDN mixer)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, V, generator=gen)
    x[..., 0] *= 30  # uneven magnitudes within a row
    proj = 2 * torch.randn(*lead, 2 * V + 3, generator=gen)
    w = 1 + 0.3 * torch.randn(V, generator=gen)
    x, proj, w = x.to(DEVICE, dtype), proj.to(DEVICE, dtype), w.to(DEVICE, w_dtype or dtype)
    gate = proj[..., V + 1 : 2 * V + 1] if strided_gate else proj[..., :V].contiguous()
    return x, gate, w


def run(backend, x, gate, w, eps=1e-5, seed=1):
    """Forward + backward of <y, dy>; returns y and the grads of x, gate, weight."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gate, w)]
    y = gated_rmsnorm(*leaves, eps=eps, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen).to(DEVICE, y.dtype)
    grads = torch.autograd.grad((y * dy).sum(), leaves)
    return dict(zip(["y", "dx", "dgate", "dw"], [y.detach(), *grads]))


@pytest.mark.parametrize(
    "lead,V",
    [((2, 7, 3), 192), ((13,), 37), ((5,), 16), ((3, 2), 256), ((1,), 100), ((2, 9, 2), 48)],
    ids=lambda p: str(p),
)
def test_matches_reference(lead, V):
    x, gate, w = make(lead, V, seed=V)
    ref = run("torch", x, gate, w)
    out = run("triton", x, gate, w)
    errs = {n: rel_err(out[n], ref[n]) for n in ref}
    assert all(e < TOL for e in errs.values()), errs
    assert out["y"].shape == x.shape and out["y"].dtype == x.dtype


def test_contiguous_gate_and_eps():
    x, gate, w = make((6, 5), 64, strided_gate=False, seed=3)
    x = x * 1e-3  # eps matters at this scale
    ref = run("torch", x, gate, w, eps=1e-6)
    out = run("triton", x, gate, w, eps=1e-6)
    for n in ref:
        assert rel_err(out[n], ref[n]) < TOL, n


def test_deterministic():
    x, gate, w = make((4, 11), 192, seed=4)
    a, b = run("triton", x, gate, w), run("triton", x, gate, w)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_reference_is_the_gdn_mixer_expression():
    """The torch reference is term for term the mixer's expression (HF's cast order)."""
    x, gate, w = make((3, 4), 24, dtype=torch.bfloat16, seed=5)
    o32 = x.float()
    o32 = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = ((w * o32.to(x.dtype)) * F.silu(gate.float())).to(x.dtype)
    assert torch.equal(gated_rmsnorm_torch(x, gate, w, 1e-5), expected)


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["w_bf16", "w_fp32"])
def test_bf16_close(w_dtype):
    """bf16 x / gate (the interpreter rounds bf16 by truncation, so only loosely on CPU)."""
    x, gate, w = make((2, 5, 3), 192, dtype=torch.bfloat16, w_dtype=w_dtype, seed=6)
    ref = run("torch", x, gate, w)
    out = run("triton", x, gate, w)
    assert out["y"].dtype == torch.bfloat16 and out["dw"].dtype == w_dtype
    for n in ref:
        assert rel_err(out[n], ref[n]) < 2e-2, n


def test_dispatch(monkeypatch):
    x, gate, w = make((3,), 16)
    with pytest.raises(ValueError, match="unknown norm backend"):
        gated_rmsnorm(x, gate, w, backend="cuda")
    with pytest.raises(ValueError, match="gate must match"):
        gated_rmsnorm(x, gate[:2], w)
    calls = []
    monkeypatch.setattr(gr, "gated_rmsnorm_torch", lambda *a: calls.append("torch"))
    gated_rmsnorm(x, gate, w)
    assert calls == []  # auto -> Triton on CUDA / under the interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gated_rmsnorm(x.cpu(), gate.cpu(), w.cpu())
    assert calls == ["torch"]
