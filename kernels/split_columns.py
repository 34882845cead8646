"""Column splits of a row-major tensor into contiguous parts, and the merge back (for gradients):
``x [R, P]`` -> ``x[:, 0:w0], x[:, w0:w0+w1], ...`` (up to 4 parts, widths summing to P).

Where the GDN layer uses them (layers/gdn.py), per head of every token:
- its input projection ``[q | k | v | gate]`` -> the conv's ``[q | k | v]`` channels and the gate;
- the conv's output ``[q | k | v]`` -> q, k, v for the recurrence kernels.
Their backwards merge the parts' gradients into one buffer.

Why kernels: torch copies a column slice with its generic strided (non-vectorised) copy, and
autograd's backward of a slice zero-fills a full-width gradient per slice and adds them up. At
7B widths both splits move the layer's widest activations: strided copies took ~7 ms of an
8192-token step on an H100 (``direct_copy_kernel``, 2026-12-05 profile), the slice backwards
more zero-fills and adds. Here each direction is one pass of 2-D tiles over blocks of rows, loads
and stores contiguous along the row; a missing gradient part is written as zeros.

``backend``: "triton", "torch", or "auto" (Triton for CUDA tensors or under TRITON_INTERPRET=1
when Triton is importable, else torch). Pure copies: both are bitwise equal.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton

MAX_PARTS = 4


def _check(widths, P: int) -> None:
    if not 1 <= len(widths) <= MAX_PARTS or min(widths) < 1 or sum(widths) != P:
        raise ValueError(
            f"split_columns needs 1..{MAX_PARTS} positive widths summing to the row width {P}; "
            f"got {tuple(widths)}"
        )


def split_columns(x: torch.Tensor, widths, backend: str = "auto") -> list[torch.Tensor]:
    """``x [R, P]`` -> contiguous ``[R, w]`` parts in order (no autograd)."""
    if x.dim() != 2:
        raise ValueError(f"split_columns needs a 2-D [rows, columns] tensor; got {tuple(x.shape)}")
    _check(widths, x.shape[1])
    if not use_triton(x, backend, "split_columns"):
        return [part.contiguous() for part in x.split(list(widths), dim=1)]
    from .split_columns_triton import split_columns_triton

    return split_columns_triton(x.contiguous(), list(widths))


def merge_columns(parts, widths, dtype, device, backend: str = "auto") -> torch.Tensor:
    """The inverse: one contiguous ``[R, sum(widths)]`` tensor from ``[R, w]`` parts; a part that
    is None (no gradient flowed into it) is written as zeros."""
    _check(widths, sum(widths))
    present = [p for p in parts if p is not None]
    if len(parts) != len(widths) or not present:
        raise ValueError(f"merge_columns needs {len(widths)} parts, at least one of them a tensor")
    R, P = present[0].shape[0], sum(widths)
    if not use_triton(present[0], backend, "split_columns"):
        out = torch.empty((R, P), dtype=dtype, device=device)
        for part, piece in zip(parts, out.split(list(widths), dim=1), strict=True):
            if part is None:
                piece.zero_()
            else:
                piece.copy_(part)
        return out
    from .split_columns_triton import merge_columns_triton

    parts = [None if p is None else p.to(dtype).contiguous() for p in parts]
    return merge_columns_triton(parts, list(widths), R, dtype, device)
