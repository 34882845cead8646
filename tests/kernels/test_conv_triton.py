"""Triton causal conv1d vs the PyTorch reference: through Triton's CPU interpreter on machines
without CUDA, compiled on CUDA tensors otherwise."""

import sys
from pathlib import Path

try:
    import kernels  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
import torch

from tests.kernels.triton_mode import (  # noqa: E402
    DEVICE,
    import_kernels,
    skip_module_unless_interpreted,
    triton_interpreter,  # noqa: F401 (autouse: the interpreter while each test runs)
)

# the interpreter on machines without CUDA (tests/kernels/triton_mode.py says why it is done so)
conv, ct = import_kernels("kernels.conv", "kernels.conv_triton")
from kernels.conv import causal_conv1d, causal_conv1d_torch  # noqa: E402
from kernels.conv_triton import (  # noqa: E402
    causal_conv1d_triton,
    causal_conv1d_update,
    causal_conv1d_update_torch,
)

skip_module_unless_interpreted(ct._conv_fwd_kernel, ct.tl.zeros)

TOL = 1e-5  # fp32 relative L2 error (observed ~1e-7: only the summation order differs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    ref = b.norm()
    return (a - b).norm().item() if ref == 0 else ((a - b).norm() / ref).item()


def make(B, T, C, W, *, init=False, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=gen).to(DEVICE, dtype)
    w = (0.5 * torch.randn(C, W, generator=gen)).to(DEVICE, dtype)
    h = torch.randn(B, W - 1, C, generator=gen).to(DEVICE, dtype) if init else None
    return x, w, h


def run(fn, x, w, h, cu, act, seed=1):
    """Forward + backward of <y, dy> + <final, df>; returns outputs and input grads."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, h) if t is not None]
    xl, wl = leaves[:2]
    hl = leaves[2] if h is not None else None
    y, final = fn(xl, wl, cu, act, hl, True)
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen).to(DEVICE, y.dtype)
    df = torch.randn(final.shape, generator=gen).to(DEVICE, final.dtype)
    grads = torch.autograd.grad((y * dy).sum() + (final * df).sum(), leaves)
    names = ["dx", "dw", "dh"][: len(leaves)]
    return {"y": y.detach(), "final": final.detach(), **dict(zip(names, grads))}


CASES = {
    # name: (B, T, C, W, cu_seqlens, initial_state, activation)
    "W4_h0_silu": (2, 37, 37, 4, None, True, "silu"),
    "W4_noh0_id": (1, 45, 37, 4, None, False, None),
    "W2_h0": (1, 21, 19, 2, None, True, "silu"),
    "W3_h0": (2, 17, 33, 3, None, True, "silu"),
    "W8_h0": (1, 19, 11, 8, None, True, "silu"),
    "W4_T_lt_W": (2, 2, 13, 4, None, True, "silu"),  # final state mixes h0 rows and x rows
    "W4_T1": (1, 1, 5, 4, None, True, None),
    "packed": (1, 45, 37, 4, [0, 1, 2, 9, 9, 26, 27, 45], False, "silu"),
    "packed_h0_ignored": (1, 20, 9, 4, [0, 3, 4, 20], True, "silu"),
    "packed_W2": (1, 18, 7, 2, [0, 1, 17, 18], False, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case):
    B, T, C, W, cu, init, act = CASES[case]
    x, w, h = make(B, T, C, W, init=init, seed=T + C)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    ref = run(causal_conv1d_torch, x, w, h, cu_t, act)
    out = run(causal_conv1d_triton, x, w, h, cu_t, act)
    assert out.keys() == ref.keys()
    errs = {n: rel_err(out[n], ref[n]) for n in ref}
    assert all(e < TOL for e in errs.values()), errs
    assert out["y"].dtype == ref["y"].dtype and out["final"].shape == (B, W - 1, C)


def test_deterministic():
    x, w, h = make(1, 37, 21, 4, init=True, seed=3)
    a = run(causal_conv1d_triton, x, w, h, None, "silu")
    b = run(causal_conv1d_triton, x, w, h, None, "silu")
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_halves_with_handed_over_state():
    """Two halves, the second starting from the first's tail, equal the whole (CP / chunked
    prefill), outputs and gradients."""
    B, T, C, W = 2, 35, 13, 4
    x, w, h = make(B, T, C, W, init=True, seed=5)
    gen = torch.Generator().manual_seed(9)
    dy = torch.randn(B, T, C, generator=gen).to(DEVICE)
    df = torch.randn(B, W - 1, C, generator=gen).to(DEVICE)

    def whole(xl, wl, hl):
        y, f = causal_conv1d_triton(xl, wl, None, "silu", hl, True)
        return y, f

    def halves(xl, wl, hl):
        y1, f1 = causal_conv1d_triton(xl[:, :19], wl, None, "silu", hl, True)
        y2, f2 = causal_conv1d_triton(xl[:, 19:], wl, None, "silu", f1, True)
        return torch.cat([y1, y2], dim=1), f2

    res = []
    for fn in (whole, halves):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, h)]
        y, f = fn(*leaves)
        grads = torch.autograd.grad((y * dy).sum() + (f * df).sum(), leaves)
        res.append([y.detach(), f.detach(), *grads])
    for name, a, b in zip(["y", "final", "dx", "dw", "dh"], *res):
        assert rel_err(a, b) < TOL, name


def test_decode_update_matches_full_conv():
    B, T, C, W = 2, 7, 37, 4
    x, w, h = make(B, T, C, W, init=True, seed=11)
    y_full, f_full = causal_conv1d_torch(x, w, None, "silu", h, True)
    state = h
    for t in range(T):
        y_t, state_new = causal_conv1d_update(x[:, t], state, w, "silu")
        y_ref, s_ref = causal_conv1d_update_torch(x[:, t], state, w, "silu")
        assert rel_err(y_t, y_full[:, t]) < TOL and rel_err(y_t, y_ref) < TOL
        assert torch.equal(state_new, s_ref)
        state = state_new
    assert torch.equal(state, f_full)


def test_dispatch(monkeypatch):
    x, w, h = make(1, 9, 5, 4, init=True)
    for backend in ("auto", "triton", "torch"):
        y = causal_conv1d(x, w, initial_state=h, backend=backend)
        assert rel_err(y, causal_conv1d_torch(x, w, initial_state=h)) < TOL
    with pytest.raises(ValueError, match="unknown conv backend"):
        causal_conv1d(x, w, backend="cuda")
    # auto picks Triton on CUDA / under the interpreter, and torch on CPU without it
    calls = []
    monkeypatch.setattr(conv, "causal_conv1d_torch", lambda *a: calls.append("torch"))
    causal_conv1d(x, w, backend="auto")
    assert calls == []
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    causal_conv1d(x.cpu(), w.cpu(), backend="auto")
    assert calls == ["torch"]


def test_bf16_close():
    """bf16 vs a float64 reference, loosely (the interpreter also rounds bf16 by truncation)."""
    x, w, h = make(1, 30, 37, 4, init=True, seed=2, dtype=torch.bfloat16)
    cu = torch.tensor([0, 5, 30], dtype=torch.int32, device=DEVICE)
    ref = run(causal_conv1d_torch, x.double(), w.double(), h.double(), cu, "silu")
    out = run(causal_conv1d_triton, x, w, h, cu, "silu")
    assert out["y"].dtype == torch.bfloat16 and out["dw"].dtype == torch.bfloat16
    for n in ref:
        assert rel_err(out[n], ref[n]) < 2e-2, n


def test_bad_input():
    x, w, h = make(2, 9, 5, 4, init=True)
    with pytest.raises(ValueError, match="batch size 1"):
        causal_conv1d_triton(x, w, torch.tensor([0, 9], device=DEVICE))
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d_triton(x, w, initial_state=h[:, :2])
    with pytest.raises(ValueError, match="width"):
        causal_conv1d_triton(x, torch.randn(5, 9, device=DEVICE))
