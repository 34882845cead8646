"""Row layout shared by the row-wise kernels (norms, gated norm, SwiGLU): a tensor ``[..., n]``
seen as ``[R, n]`` rows with a unit column stride, so a kernel can walk rows by one stride."""

from __future__ import annotations

import torch


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` as ``[R, n]`` with a unit column stride: a view where the leading dims
    collapse (contiguous tensors, column slices of wider rows such as q/k of a qkv output or the
    gate of a projection), else a contiguous copy."""
    n = t.shape[-1]
    if n > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    rows = t.reshape(t.shape[:-1].numel(), n)
    if n > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def row_stride(rows: torch.Tensor) -> int:
    """The stride between rows of an ``[R, n]`` tensor (a single row's own stride is
    arbitrary: report its width)."""
    return rows.stride(0) if rows.shape[0] > 1 else rows.shape[1]
