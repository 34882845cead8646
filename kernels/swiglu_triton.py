"""Triton kernels of :mod:`.swiglu`: one program per (row, column block) of ``[N, F]``.

- ``_swiglu_fwd_kernel``: reads ``gate = x[r, c]`` and ``linear = x[r, F + c]``, writes
  ``silu(gate) * linear`` in the output's dtype.
- ``_swiglu_bwd_kernel``: reads the same two inputs and ``dy[r, c]``, recomputes the sigmoid and
  writes both halves of ``dx[r, :]`` (one buffer of ``x``'s shape)::

      d gate   = dy * linear * s * (1 + gate * (1 - s))      s = sigmoid(gate)
      d linear = dy * gate * s

Arithmetic is float32 for 16/32-bit inputs (float64 for float64 ones); one rounding to the
output dtype at the store. Row offsets are int64 (``row * stride`` passes 2**31 at 8192 x 22016
elements per micro-batch x a few), column offsets stay int32 (one row is < 2**31 elements).
Rows sit on grid axis 0 (up to 2**31 - 1 programs), column blocks on axis 1 (F / BLOCK <= 65535).
Elementwise, so the result does not depend on the grid: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd_kernel(
    x_ptr,
    stride_x,
    y_ptr,
    stride_y,
    F,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    xrow = x_ptr + row * stride_x
    if FP64:
        g = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float64)
        u = tl.load(xrow + F + cols, mask=mask, other=0.0).to(tl.float64)
    else:
        g = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(xrow + F + cols, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    y = g * s * u
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    x_ptr,
    stride_x,
    dy_ptr,
    stride_dy,
    dx_ptr,
    stride_dx,
    F,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    xrow = x_ptr + row * stride_x
    if FP64:
        g = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float64)
        u = tl.load(xrow + F + cols, mask=mask, other=0.0).to(tl.float64)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float64)
    else:
        g = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(xrow + F + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    silu = g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * silu
    dxrow = dx_ptr + row * stride_dx
    out_ty = dx_ptr.dtype.element_ty
    tl.store(dxrow + cols, dg.to(out_ty), mask=mask)
    tl.store(dxrow + F + cols, du.to(out_ty), mask=mask)


def _launch(f: int) -> tuple[int, int]:
    """(block, warps): 1024-wide blocks over 4 warps = 8 elements per thread (16-byte bf16
    accesses); 11008 columns per row (7B width, TP 1) take 11 blocks, the last one masked."""
    block = min(1024, triton.next_power_of_2(max(f, 16)))
    return block, max(1, min(4, block // 256))


def swiglu_fwd_triton(x2: torch.Tensor) -> torch.Tensor:
    """``x2``: ``[N, 2F]`` with a unit last stride (any row stride). Returns ``[N, F]``."""
    n, two_f = x2.shape
    f = two_f // 2
    y = torch.empty((n, f), dtype=x2.dtype, device=x2.device)
    if n and f:
        block, warps = _launch(f)
        _swiglu_fwd_kernel[(n, triton.cdiv(f, block))](
            x2,
            x2.stride(0),
            y,
            y.stride(0),
            f,
            BLOCK=block,
            FP64=x2.dtype == torch.float64,
            num_warps=warps,
        )
    return y


def swiglu_bwd_triton(x2: torch.Tensor, dy2: torch.Tensor) -> torch.Tensor:
    """``x2``: ``[N, 2F]``, ``dy2``: ``[N, F]``, both with a unit last stride. Returns
    ``dx``: ``[N, 2F]`` contiguous, in ``x2``'s dtype."""
    n, two_f = x2.shape
    f = two_f // 2
    dx = torch.empty((n, two_f), dtype=x2.dtype, device=x2.device)
    if n and f:
        block, warps = _launch(f)
        _swiglu_bwd_kernel[(n, triton.cdiv(f, block))](
            x2,
            x2.stride(0),
            dy2,
            dy2.stride(0),
            dx,
            dx.stride(0),
            f,
            BLOCK=block,
            FP64=x2.dtype == torch.float64,
            num_warps=warps,
        )
    return dx
