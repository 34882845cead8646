"""The optional per-head L2 norm of q and k (forward and backward), float32 maths."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    _sum,
)


@triton.jit
def _l2norm_fwd_kernel(
    x_ptr, y_ptr, rstd_ptr, R, D: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr
):
    """y = x * rstd with rstd = rsqrt(sum(x^2) + 1e-6) over the last dim of R rows (float32
    maths; y in y's dtype: the chunk kernels read it as a matmul operand, so 16-bit inputs stay
    16-bit; rstd float32, kept for the backward)."""
    r0 = tl.program_id(0).to(tl.int64) * BR
    r_R = tl.arange(0, BR)
    d_D = tl.arange(0, DP)
    offs = r0 * D + (r_R[:, None] * D + d_D[None, :])
    mask = (r0 + r_R[:, None] < R) & (d_D[None, :] < D)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(_sum(x * x, 1) + 1e-6)
    tl.store(y_ptr + offs, (x * rstd[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + r0 + r_R, rstd, mask=r0 + r_R < R)


@triton.jit
def _l2norm_bwd_kernel(
    y_ptr, rstd_ptr, dy_ptr, dx_ptr, R, D: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr
):
    """dx = rstd (dy - y (dy . y)) from the forward's y and rstd (float32 maths)."""
    r0 = tl.program_id(0).to(tl.int64) * BR
    r_R = tl.arange(0, BR)
    d_D = tl.arange(0, DP)
    offs = r0 * D + (r_R[:, None] * D + d_D[None, :])
    mask = (r0 + r_R[:, None] < R) & (d_D[None, :] < D)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + r0 + r_R, mask=r0 + r_R < R, other=0.0)
    dx = rstd[:, None] * (dy - y * _sum(dy * y, 1)[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
