"""Triton kernels of :mod:`.split_columns`: one program per block of ``ROWS`` rows and one masked
2-D tile per part (its width padded to a power of two). Part widths and offsets are runtime
values, the padded widths constexpr (a width of 0 = no such part). Row offsets are int64
(``R * P`` passes 2**31 at 7B widths and 32K tokens). Pure copies: deterministic and exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(src_ptr, src_stride, src_col0, dst_ptr, dst_stride, dst_col0, rows, R, width,
          ROWS: tl.constexpr, BW: tl.constexpr, ZERO: tl.constexpr):  # fmt: skip
    cols = tl.arange(0, BW)
    mask = (rows[:, None] < R) & (cols[None, :] < width)
    if ZERO:
        vals = tl.zeros((ROWS, BW), dtype=dst_ptr.dtype.element_ty)
    else:
        vals = tl.load(src_ptr + rows[:, None] * src_stride + src_col0 + cols[None, :], mask=mask)
    tl.store(dst_ptr + rows[:, None] * dst_stride + dst_col0 + cols[None, :], vals, mask=mask)


@triton.jit
def _split_kernel(x_ptr, p0, p1, p2, p3, R, P, w0, w1, w2, w3,
                  ROWS: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr,
                  B3: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    _tile(x_ptr, P, 0, p0, w0, 0, rows, R, w0, ROWS, B0, False)
    if B1 > 0:
        _tile(x_ptr, P, w0, p1, w1, 0, rows, R, w1, ROWS, B1, False)
    if B2 > 0:
        _tile(x_ptr, P, w0 + w1, p2, w2, 0, rows, R, w2, ROWS, B2, False)
    if B3 > 0:
        _tile(x_ptr, P, w0 + w1 + w2, p3, w3, 0, rows, R, w3, ROWS, B3, False)


@triton.jit
def _merge_kernel(out_ptr, p0, p1, p2, p3, R, P, w0, w1, w2, w3,
                  ROWS: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr,
                  B3: tl.constexpr, Z0: tl.constexpr, Z1: tl.constexpr, Z2: tl.constexpr,
                  Z3: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    _tile(p0, w0, 0, out_ptr, P, 0, rows, R, w0, ROWS, B0, Z0)
    if B1 > 0:
        _tile(p1, w1, 0, out_ptr, P, w0, rows, R, w1, ROWS, B1, Z1)
    if B2 > 0:
        _tile(p2, w2, 0, out_ptr, P, w0 + w1, rows, R, w2, ROWS, B2, Z2)
    if B3 > 0:
        _tile(p3, w3, 0, out_ptr, P, w0 + w1 + w2, rows, R, w3, ROWS, B3, Z3)


def _launch(widths: list[int]) -> tuple[int, list[int], list[int]]:
    """(ROWS, the 4 widths, the 4 padded widths): about 8K tile elements per program (8 rows of
    the 7B projection's 384 + 192 columns padded to 512 + 256), 4 warps."""
    w = widths + [0] * (4 - len(widths))
    b = [triton.next_power_of_2(x) if x else 0 for x in w]
    rows = max(1, min(64, triton.next_power_of_2(max(1, 8192 // sum(b)))))
    return rows, w, b


def split_columns_triton(x: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """``x``: contiguous ``[R, P]``. Returns the contiguous ``[R, w]`` parts."""
    R, P = x.shape
    parts = [torch.empty((R, w), dtype=x.dtype, device=x.device) for w in widths]
    if R:
        rows, w, b = _launch(widths)
        ptrs = parts + [parts[0]] * (4 - len(parts))  # unused slots: any valid pointer
        _split_kernel[(triton.cdiv(R, rows),)](
            x, *ptrs, R, P, *w, ROWS=rows, B0=b[0], B1=b[1], B2=b[2], B3=b[3], num_warps=4
        )
    return parts


def merge_columns_triton(parts, widths: list[int], R: int, dtype, device) -> torch.Tensor:
    """Contiguous ``[R, w]`` parts (None = zeros) -> contiguous ``[R, sum(widths)]``."""
    P = sum(widths)
    out = torch.empty((R, P), dtype=dtype, device=device)
    if R:
        rows, w, b = _launch(widths)
        ptrs = [out if p is None else p for p in parts] + [out] * (4 - len(parts))
        zero = [p is None for p in parts] + [True] * (4 - len(parts))
        _merge_kernel[(triton.cdiv(R, rows),)](
            out, *ptrs, R, P, *w, ROWS=rows, B0=b[0], B1=b[1], B2=b[2], B3=b[3],
            Z0=zero[0], Z1=zero[1], Z2=zero[2], Z3=zero[3], num_warps=4,
        )  # fmt: skip
    return out
