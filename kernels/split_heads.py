"""GDN's per-head split of the input projection: ``proj [R, P]`` (each row one head of one token,
``[q | k | v | gate]``) -> ``head [R, n]`` (``[q | k | v]``, the conv's channels) and
``tail [R, P - n]`` (the output gate), both contiguous; and back for the gradient.

Why a kernel: torch copies a column slice of a row-major tensor with its generic strided copy
(not vectorised). At 7B widths the GDN layer moves its whole projection through it twice (the
split forward, the gradient merge backward): ~7 ms per 8192-token step on an H100 (the
``direct_copy_kernel`` of the 2026-12-05 profile). Here each direction is one pass of 2-D tiles
over whole rows, loads and stores contiguous along the row.

``backend``: "triton", "torch", or "auto" (Triton for CUDA tensors or under TRITON_INTERPRET=1
when Triton is importable, else torch). Both are pure copies: the results are bitwise equal.
"""

from __future__ import annotations

import torch

from .dispatch import triton_available, triton_interpreting

BACKENDS = ("auto", "torch", "triton")


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown split_heads backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        return (x.is_cuda or triton_interpreting()) and triton_available()
    return backend == "triton"


def _check(proj: torch.Tensor, n: int) -> None:
    if proj.dim() != 2 or not 0 < n < proj.shape[1]:
        raise ValueError(
            f"split_heads needs proj [R, P] and 0 < n < P; got {tuple(proj.shape)}, {n}"
        )


def split_heads(proj: torch.Tensor, n: int, backend: str = "auto"):
    """``(proj[:, :n], proj[:, n:])`` as two contiguous tensors (no autograd)."""
    _check(proj, n)
    if not _use_triton(proj, backend):
        return proj[:, :n].contiguous(), proj[:, n:].contiguous()
    from .split_heads_triton import split_heads_triton

    return split_heads_triton(proj.contiguous(), n)


def merge_heads(head: torch.Tensor | None, tail: torch.Tensor | None, shape, dtype, device,
                backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """The inverse: ``[head | tail]`` per row as one contiguous ``[R, P]`` tensor; a missing part
    (None: no gradient flowed into it) is written as zeros."""
    R, P = shape
    probe = head if head is not None else tail
    if probe is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    n = head.shape[1] if head is not None else P - tail.shape[1]
    _check(torch.empty(0, P, device="meta"), n)
    if not _use_triton(probe, backend):
        out = torch.empty(shape, dtype=dtype, device=device)
        for part, cols in ((head, slice(0, n)), (tail, slice(n, P))):
            if part is None:
                out[:, cols].zero_()
            else:
                out[:, cols] = part
        return out
    from .split_heads_triton import merge_heads_triton

    parts = [None if t is None else t.to(dtype).contiguous() for t in (head, tail)]
    return merge_heads_triton(parts[0], parts[1], R, P, n, dtype, device)
