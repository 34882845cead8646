"""Triton kernels of :mod:`.rmsnorm` (the full-width QK-norm). Shapes: ``x`` ``[R, N]`` (rows =
tokens, N = this TP rank's slice of the normalised width ``W``), unit column stride, any row
stride; ``w`` ``[N]``; per-row fp32 vectors ``[R]``.

- ``_row_reduce_kernel``: per row, ``sum(x^2)`` (forward) or ``sum(dy * w * x)`` (backward),
  fp32, over column blocks of ``BN`` (a loop, so any N). The caller all-reduces it over TP.
- ``_norm_fwd_kernel``: ``r = rsqrt(ss / W + eps)`` per row (stored by the first column block)
  and ``y = (w * (x * r)).to(y.dtype)``, the cast order of the torch path.
- ``_norm_bwd_kernel``: ``dx = r * g - x * r^3 * c / W`` with ``g = dy * w`` and the
  all-reduced ``c``; and this program's share of ``dweight = sum_rows dy * x * r``. A persistent
  grid of ``G`` programs along axis 0 (program p owns row blocks p, p + G, ...) x column blocks
  along axis 1: each program writes one ``[BN]`` slice of a ``[G, N]`` fp32 partial, which the
  host sums in a fixed order. No atomics, so ``dweight`` is deterministic for a given (R, device).

Arithmetic is fp32 (x is read in its dtype and converted on load). Row offsets are int64
(``rows x row stride`` passes 2**31 at 8192 tokens x micro-batches x 3840 and more); column
offsets are int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import row_stride


@triton.jit
def _row_reduce_kernel(
    x_ptr,
    sx,
    dy_ptr,
    sdy,
    w_ptr,
    out_ptr,  # [R] fp32
    R,
    N,
    BR: tl.constexpr,
    BN: tl.constexpr,
    NCB: tl.constexpr,  # column blocks: cdiv(N, BN)
    BWD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    r_ok = rows < R
    acc = tl.zeros([BR], dtype=tl.float32)
    for cb in range(NCB):
        cols = cb * BN + tl.arange(0, BN)
        c_ok = cols < N
        m = r_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if BWD:
            dy = tl.load(dy_ptr + rows[:, None] * sdy + cols[None, :], mask=m, other=0.0)
            w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
            acc += tl.sum(dy.to(tl.float32) * w[None, :] * x, axis=1)
        else:
            acc += tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows, acc, mask=r_ok)


@triton.jit
def _norm_fwd_kernel(
    x_ptr,
    sx,
    w_ptr,
    ss_ptr,  # [R] fp32: the all-reduced sum of squares
    r_ptr,  # [R] fp32 out
    y_ptr,  # [R, N] contiguous out
    R,
    N,
    width,
    eps,
    BR: tl.constexpr,
    BN: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cb = tl.program_id(1)
    cols = cb * BN + tl.arange(0, BN)
    r_ok = rows < R
    c_ok = cols < N
    m = r_ok[:, None] & c_ok[None, :]
    ss = tl.load(ss_ptr + rows, mask=r_ok, other=0.0)
    r = tl.rsqrt(ss / width + eps)
    tl.store(r_ptr + rows, r, mask=r_ok & (cb == 0))
    x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    y = w[None, :] * (x * r[:, None])
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _norm_bwd_kernel(
    x_ptr,
    sx,
    dy_ptr,
    sdy,
    w_ptr,
    r_ptr,  # [R] fp32
    c_ptr,  # [R] fp32: the all-reduced sum(dy * w * x)
    dx_ptr,  # [R, N] contiguous out
    dwp_ptr,  # [G, N] fp32 out
    R,
    N,
    width,
    NB,  # row blocks
    G,  # programs along axis 0
    BR: tl.constexpr,
    BN: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    c_ok = cols < N
    w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BN], dtype=tl.float32)
    # a while loop: the interpreter cannot take a runtime int as a range() bound (numpy >= 2.5)
    blk = pid
    while blk < NB:
        rows = blk.to(tl.int64) * BR + tl.arange(0, BR)
        r_ok = rows < R
        m = r_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * sdy + cols[None, :], mask=m, other=0.0)
        dy = dy.to(tl.float32)
        r = tl.load(r_ptr + rows, mask=r_ok, other=0.0)
        c = tl.load(c_ptr + rows, mask=r_ok, other=0.0)
        xr = x * r[:, None]
        dw += tl.sum(dy * xr, axis=0)
        k = r * r * c / width  # per row: r^2 c / W
        dx = r[:, None] * (dy * w[None, :]) - xr * k[:, None]
        tl.store(dx_ptr + rows[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
        blk += G
    tl.store(dwp_ptr + pid.to(tl.int64) * N + cols, dw, mask=c_ok)


def _gpu_sizes(x: torch.Tensor) -> bool:
    return x.is_cuda and not triton.knobs.runtime.interpret


def _tiles(x: torch.Tensor, n: int) -> tuple[int, int, int]:
    """(BR, BN, warps): ~4K-element tiles on the GPU (a whole 3840-wide row in one block, 16
    elements per thread at 8 warps); in the interpreter small tiles, so that test widths span
    several row and column blocks."""
    bn = triton.next_power_of_2(max(n, 1))
    if _gpu_sizes(x):
        bn = min(bn, 4096)
        br = max(1, min(64, 4096 // bn))
        return br, bn, 8 if br * bn >= 4096 else 4
    return 4, min(bn, 64), 4


def row_reduce(x2: torch.Tensor, dy2: torch.Tensor | None, w: torch.Tensor | None) -> torch.Tensor:
    """Per-row fp32 ``sum(x^2)`` (``dy2`` None) or ``sum(dy * w * x)`` of ``[R, N]`` tensors."""
    R, N = x2.shape
    out = torch.zeros(R, dtype=torch.float32, device=x2.device)
    if R and N:
        br, bn, warps = _tiles(x2, N)
        bwd = dy2 is not None
        _row_reduce_kernel[(triton.cdiv(R, br),)](
            x2,
            row_stride(x2),
            dy2 if bwd else x2,
            row_stride(dy2) if bwd else 0,
            w if bwd else x2,
            out,
            R,
            N,
            BR=br,
            BN=bn,
            NCB=triton.cdiv(N, bn),
            BWD=bwd,
            num_warps=warps,
        )
    return out


def norm_fwd(x2, w, ss, width: int, eps: float):
    """(y [R, N] in x's dtype, r [R] fp32) from the all-reduced sum of squares ``ss``."""
    R, N = x2.shape
    y = torch.empty((R, N), dtype=x2.dtype, device=x2.device)
    r = torch.empty(R, dtype=torch.float32, device=x2.device)
    if R and N:
        br, bn, warps = _tiles(x2, N)
        _norm_fwd_kernel[(triton.cdiv(R, br), triton.cdiv(N, bn))](
            x2, row_stride(x2), w, ss, r, y, R, N, float(width), eps,
            BR=br, BN=bn, num_warps=warps,
        )  # fmt: skip
    elif R:
        r = torch.rsqrt(ss / width + eps)
    return y, r


def norm_bwd(x2, dy2, w, r, c, width: int):
    """(dx [R, N] in x's dtype, dweight [N] fp32) from the all-reduced ``c``."""
    R, N = x2.shape
    br, bn, warps = _tiles(x2, N)
    nb = triton.cdiv(R, br)
    if _gpu_sizes(x2):
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count
        # enough programs to fill the GPU with the column blocks, each looping over row blocks
        g = min(nb, max(1, (4 * sms) // triton.cdiv(N, bn)))
    else:
        g = min(nb, 3)
    g = max(g, 1)
    dx = torch.empty((R, N), dtype=x2.dtype, device=x2.device)
    dwp = torch.zeros((g, N), dtype=torch.float32, device=x2.device)
    if R and N:
        _norm_bwd_kernel[(g, triton.cdiv(N, bn))](
            x2, row_stride(x2), dy2, row_stride(dy2), w, r, c, dx, dwp, R, N, float(width),
            nb, g, BR=br, BN=bn, num_warps=warps,
        )  # fmt: skip
    return dx, dwp.sum(dim=0)  # fixed-order reduction of the per-program partials
