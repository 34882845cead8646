"""Triton kernels of :mod:`.split_heads`: one program per block of ``ROWS`` rows, two 2-D tiles
per block (the ``n`` head columns and the ``P - n`` tail columns, each padded to a power of two
and masked). Row offsets are int64 (``R * P`` passes 2**31 at 7B widths and 32K tokens). Pure
copies: deterministic and exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_tile(src_ptr, src_stride, src_col0, dst_ptr, dst_stride, dst_col0, rows, R, width,
               ROWS: tl.constexpr, BW: tl.constexpr, ZERO: tl.constexpr):  # fmt: skip
    cols = tl.arange(0, BW)
    mask = (rows[:, None] < R) & (cols[None, :] < width)
    if ZERO:
        vals = tl.zeros((ROWS, BW), dtype=dst_ptr.dtype.element_ty)
    else:
        vals = tl.load(src_ptr + rows[:, None] * src_stride + src_col0 + cols[None, :], mask=mask)
    tl.store(dst_ptr + rows[:, None] * dst_stride + dst_col0 + cols[None, :], vals, mask=mask)


@triton.jit
def _split_kernel(proj_ptr, head_ptr, tail_ptr, R, P, N,
                  ROWS: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    _copy_tile(proj_ptr, P, 0, head_ptr, N, 0, rows, R, N, ROWS, BN, False)
    _copy_tile(proj_ptr, P, N, tail_ptr, P - N, 0, rows, R, P - N, ROWS, BT, False)


@triton.jit
def _merge_kernel(head_ptr, tail_ptr, out_ptr, R, P, N, ROWS: tl.constexpr, BN: tl.constexpr,
                  BT: tl.constexpr, HEAD_ZERO: tl.constexpr, TAIL_ZERO: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    _copy_tile(head_ptr, N, 0, out_ptr, P, 0, rows, R, N, ROWS, BN, HEAD_ZERO)
    _copy_tile(tail_ptr, P - N, 0, out_ptr, P, N, rows, R, P - N, ROWS, BT, TAIL_ZERO)


def _launch(n: int, t: int) -> tuple[int, int, int]:
    """(ROWS, BN, BT): about 8K elements per program (8 rows of 7B's 384 + 192 columns padded to
    512 + 256), 4 warps."""
    bn, bt = triton.next_power_of_2(n), triton.next_power_of_2(t)
    rows = max(1, min(64, triton.next_power_of_2(max(1, 8192 // (bn + bt)))))
    return rows, bn, bt


def split_heads_triton(proj: torch.Tensor, n: int):
    """``proj``: contiguous ``[R, P]``. Returns contiguous ``([R, n], [R, P - n])``."""
    R, P = proj.shape
    head = torch.empty((R, n), dtype=proj.dtype, device=proj.device)
    tail = torch.empty((R, P - n), dtype=proj.dtype, device=proj.device)
    if R:
        rows, bn, bt = _launch(n, P - n)
        _split_kernel[(triton.cdiv(R, rows),)](proj, head, tail, R, P, n, ROWS=rows, BN=bn, BT=bt,
                                               num_warps=4)  # fmt: skip
    return head, tail


def merge_heads_triton(head, tail, R: int, P: int, n: int, dtype, device) -> torch.Tensor:
    """``head`` ``[R, n]`` / ``tail`` ``[R, P - n]`` contiguous, either may be None (zeros).
    Returns contiguous ``[R, P]``."""
    out = torch.empty((R, P), dtype=dtype, device=device)
    if R:
        rows, bn, bt = _launch(n, P - n)
        _merge_kernel[(triton.cdiv(R, rows),)](
            out if head is None else head, out if tail is None else tail, out, R, P, n,
            ROWS=rows, BN=bn, BT=bt, HEAD_ZERO=head is None, TAIL_ZERO=tail is None, num_warps=4,
        )  # fmt: skip
    return out
