"""Triton kernels of :mod:`.cross_entropy`: one program per token row walks the row's vocabulary
slice in blocks.

- ``_row_stats_kernel``: online max / sum of exp(x - max) (the running sum is rescaled when the
  max grows, so the row is read once) and the target's logit when it lies in this slice.
- ``_grad_kernel``: ``exp(x - lse) * scale`` with ``- grad_ce`` at the target column, written in
  the logits' dtype (in place when the output aliases the input: each element is read before it
  is written, by the same program).

Statistics are fp32 whatever the logits' dtype. Rows are independent, so the result does not
depend on the grid: the kernels are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_stats_kernel(
    x_ptr,
    stride_row,
    local_t_ptr,
    m_ptr,
    s_ptr,
    picked_ptr,
    V,
    NUM_BLOCKS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for i in range(0, NUM_BLOCKS):
        idx = i * BLOCK + cols
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # lanes that have seen only -inf keep s = 0 (avoid exp(-inf - -inf) = nan)
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        p = tl.where(m_new == float("-inf"), 0.0, tl.exp(x - m_new))
        s = s * alpha + p
        m = m_new
    m_row = tl.max(m, axis=0)
    scale = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_row))
    s_row = tl.sum(s * scale, axis=0)
    t = tl.load(local_t_ptr + row)
    hit = (t >= 0) & (t < V)
    t_safe = tl.where(hit, t, 0)
    picked = tl.load(base + t_safe).to(tl.float32)
    picked = tl.where(hit, picked, 0.0)
    tl.store(m_ptr + row, m_row)
    tl.store(s_ptr + row, s_row)
    tl.store(picked_ptr + row, picked)


@triton.jit
def _grad_kernel(
    x_ptr,
    stride_row,
    out_ptr,
    stride_out,
    lse_ptr,
    scale_ptr,
    grad_ce_ptr,
    local_t_ptr,
    V,
    NUM_BLOCKS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    obase = out_ptr + row * stride_out
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    g_ce = tl.load(grad_ce_ptr + row)
    t = tl.load(local_t_ptr + row)
    cols = tl.arange(0, BLOCK)
    for i in range(0, NUM_BLOCKS):
        idx = i * BLOCK + cols
        mask = idx < V
        x = tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32)
        g = tl.exp(x - lse) * scale
        g = tl.where(idx == t, g - g_ce, g)
        tl.store(obase + idx, g.to(out_ptr.dtype.element_ty), mask=mask)


def _block(v: int) -> tuple[int, int, int]:
    """(block, blocks per row, warps): 4096-wide blocks keep 25 trips per row at a 100K
    vocabulary with enough loads in flight per SM."""
    block = min(4096, triton.next_power_of_2(max(v, 16)))
    return block, triton.cdiv(v, block), 8 if block >= 2048 else 4


def row_stats_triton(logits, local_t, in_range):
    n, v = logits.shape
    m = torch.empty(n, dtype=torch.float32, device=logits.device)
    s = torch.empty_like(m)
    picked = torch.empty_like(m)
    t = torch.where(in_range, local_t, torch.full_like(local_t, -1)).contiguous()
    if n:
        block, nb, warps = _block(v)
        _row_stats_kernel[(n,)](
            logits, logits.stride(0), t, m, s, picked, v, nb, BLOCK=block, num_warps=warps
        )
    return m, s, picked


def grad_triton(logits, lse, scale, grad_ce, local_t, in_range, out):
    n, v = logits.shape
    t = torch.where(in_range, local_t, torch.full_like(local_t, -1)).contiguous()
    if n:
        block, nb, warps = _block(v)
        _grad_kernel[(n,)](
            logits,
            logits.stride(0),
            out,
            out.stride(0),
            lse.contiguous(),
            scale,
            grad_ce,
            t,
            v,
            nb,
            BLOCK=block,
            num_warps=warps,
        )
    return out
