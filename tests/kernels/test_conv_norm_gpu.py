"""GPU: Triton conv1d and gated RMSNorm at Olmo Hybrid 7B sizes vs the torch references.

Olmo Hybrid: 30 GDN heads, K = 96, V = 192, conv width 4, so C = 30 * (96 + 96 + 192) = 11520
conv channels, and the norm runs on T * 30 rows of width 192.

Run: ``python3 -m pytest -q -s -m gpu tests/kernels/test_conv_norm_gpu.py`` (-s prints the
errors). Timings: ``benchmarks/gdn_kernels.py`` (its conv1d / gated-norm rows).
"""

import sys
from pathlib import Path

try:
    import kernels  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HEADS, K, V, W = 30, 96, 192, 4
C = HEADS * (K + K + V)
T = 8192


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    ref = b.norm()
    return (a - b).norm().item() if ref == 0 else ((a - b).norm() / ref).item()


def conv_inputs(dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(1, T, C, device="cuda", generator=gen).to(dtype)
    w = (0.5 * torch.randn(C, W, device="cuda", generator=gen)).to(dtype)
    h = torch.randn(1, W - 1, C, device="cuda", generator=gen).to(dtype)
    dy = torch.randn(1, T, C, device="cuda", generator=gen).to(dtype)
    df = torch.randn(1, W - 1, C, device="cuda", generator=gen).to(dtype)
    return x, w, h, dy, df


def conv_run(fn, x, w, h, dy, df, cu=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, h)]
    y, f = fn(leaves[0], leaves[1], cu, "silu", leaves[2], True)
    grads = torch.autograd.grad((y * dy).sum() + (f * df).sum(), leaves)
    return dict(zip(["y", "final", "dx", "dw", "dh"], [y.detach(), f.detach(), *grads]))


@pytest.mark.parametrize("packed", [False, True], ids=["h0", "packed"])
def test_conv_fp32_matches_reference(packed):
    from kernels.conv import causal_conv1d_torch
    from kernels.conv_triton import causal_conv1d_triton

    x, w, h, dy, df = conv_inputs(torch.float32)
    cu = None
    if packed:
        cu = torch.tensor([0, 1, 2, 777, 4096, 4097, T], dtype=torch.int32, device="cuda")
    ref = conv_run(causal_conv1d_torch, x, w, h, dy, df, cu)
    out = conv_run(causal_conv1d_triton, x, w, h, dy, df, cu)
    errs = {n: rel_err(out[n], ref[n]) for n in ref if ref[n].norm() > 0}
    print(f"\nconv fp32 {'packed' if packed else 'h0'} rel errors: {errs}")
    assert all(e < 1e-5 for e in errs.values()), errs
    if packed:  # the initial state is masked out with cu_seqlens, so its gradient is 0
        assert torch.count_nonzero(out["dh"] - ref["dh"]) == 0


def test_conv_bf16_and_determinism():
    from kernels.conv import causal_conv1d_torch
    from kernels.conv_triton import causal_conv1d_triton

    x, w, h, dy, df = conv_inputs(torch.bfloat16, seed=1)
    exact = conv_run(causal_conv1d_torch, *(t.double() for t in (x, w, h, dy, df)))
    ref = conv_run(causal_conv1d_torch, x, w, h, dy, df)
    out = conv_run(causal_conv1d_triton, x, w, h, dy, df)
    errs = {n: (rel_err(out[n], exact[n]), rel_err(ref[n], exact[n])) for n in exact}
    print(f"\nconv bf16 rel errors vs fp64 (triton, torch bf16): {errs}")
    for n, (e_triton, e_torch) in errs.items():
        assert e_triton < max(2 * e_torch, 1e-2), n
    again = conv_run(causal_conv1d_triton, x, w, h, dy, df)
    for n in out:
        assert torch.equal(out[n], again[n]), n


# ---- gated RMSNorm ------------------------------------------------------------------------


def norm_inputs(dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(1, T, HEADS, V, device="cuda", generator=gen).to(dtype)
    proj = torch.randn(1, T, HEADS, 2 * K + 2 * V, device="cuda", generator=gen).to(dtype)
    gate = proj[..., 2 * K + V :]  # the mixer's strided gate view
    w = (1 + 0.3 * torch.randn(V, device="cuda", generator=gen)).to(dtype)
    dy = torch.randn(1, T, HEADS, V, device="cuda", generator=gen).to(dtype)
    return x, gate, w, dy


def norm_run(backend, x, gate, w, dy):
    from kernels.gated_rmsnorm import gated_rmsnorm

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gate, w)]
    y = gated_rmsnorm(*leaves, eps=1e-5, backend=backend)
    grads = torch.autograd.grad(y, leaves, dy)
    return dict(zip(["y", "dx", "dgate", "dw"], [y.detach(), *grads]))


def test_norm_fp32_matches_reference():
    x, gate, w, dy = norm_inputs(torch.float32)
    ref, out = norm_run("torch", x, gate, w, dy), norm_run("triton", x, gate, w, dy)
    errs = {n: rel_err(out[n], ref[n]) for n in ref}
    print(f"\nnorm fp32 rel errors: {errs}")
    assert all(e < 1e-5 for e in errs.values()), errs


def test_norm_bf16_and_determinism():
    x, gate, w, dy = norm_inputs(torch.bfloat16, seed=1)
    ref, out = norm_run("torch", x, gate, w, dy), norm_run("triton", x, gate, w, dy)
    errs = {n: rel_err(out[n], ref[n]) for n in ref}
    same = (out["y"] == ref["y"]).float().mean().item()
    print(f"\nnorm bf16 rel errors vs torch bf16: {errs}; y bitwise equal: {same:.4f}")
    assert all(e < 1e-2 for e in errs.values()), errs
    assert same > 0.99  # forward mirrors torch's roundings
    again = norm_run("triton", x, gate, w, dy)
    for n in out:
        assert torch.equal(out[n], again[n]), n
