"""RMSNorm over a width split across tensor-parallel ranks: Olmo's full-width QK-norm.

For ``x`` ``[..., n]``, this rank's slice of a ``full_width`` row (``n = full_width / TP``), and
its slice ``weight`` ``[n]``::

    x32 = x.float()
    r   = rsqrt(sum over all TP ranks of sum(x32^2) / full_width + eps)     per row, fp32
    y   = (weight * (x32 * r)).to(x.dtype)        (weight times fp32: fp32)

Why a kernel: the eager version keeps fp32 ``[rows, n]`` intermediates for the backward (the fp32
copy of x and the normalised value: 8 bytes per element, 61 KB per token per attention layer at
7B widths, q and k) and runs ~6 elementwise kernels forward and ~10 backward over them. Here the
forward is a row reduction + one normalising pass, the backward a row reduction + one pass that
writes ``dx`` and per-program ``dweight`` partials; only ``x`` (in its own dtype), ``weight`` and
``r`` (``[rows]`` fp32) are saved. Backward, with ``g = dy * weight`` (fp32)::

    c  = sum over all TP ranks of sum(g * x32)                            per row
    dx = r * g - x32 * r^3 * c / full_width
    dweight = sum over rows of dy * x32 * r      (fp32 partials summed in a fixed order)

Tensor parallelism: ``all_reduce(t)`` sums a small fp32 tensor over the TP group, in place or by
returning the sum (None = one rank). The Triton path calls it exactly once in the forward (the
sums of squares) and once in the backward (``c``), outside autograd, in the same order on every
rank whatever the data. The torch path runs autograd through it, so there it must be
differentiable with the all-reduce's transpose as its backward (``all_reduce_sum`` of
``megatron_hybrid.parallel.collectives`` is).

``backend``: "torch" (today's eager ops with plain autograd: bitwise what the model computed
before this kernel, the CPU path), "triton", or "auto" (Triton for CUDA tensors or under
TRITON_INTERPRET=1 when Triton is importable, else torch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .dispatch import use_triton
from .rows import as_rows

AllReduce = Callable[[torch.Tensor], "torch.Tensor | None"]


def _reduced(t: torch.Tensor, all_reduce: AllReduce | None) -> torch.Tensor:
    if all_reduce is None:
        return t
    out = all_reduce(t)
    return t if out is None else out


def tp_rmsnorm_torch(x, weight, eps: float, full_width: int, all_reduce=None) -> torch.Tensor:
    """The eager reference (``TPFullWidthRMSNorm``'s math before this kernel), op for op."""
    x32 = x.float()
    sum_sq = _reduced(x32.pow(2).sum(-1, keepdim=True), all_reduce)
    y = x32 * torch.rsqrt(sum_sq / full_width + eps)
    return (weight * y).to(x.dtype)


class _TPRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, full_width, all_reduce):
        from .rmsnorm_triton import norm_fwd, row_reduce

        x2 = as_rows(x)
        w = weight.contiguous()
        ss = _reduced(row_reduce(x2, None, None), all_reduce)
        y2, r = norm_fwd(x2, w, ss, full_width, eps)
        ctx.save_for_backward(x2, w, r)
        ctx.full_width, ctx.all_reduce = full_width, all_reduce
        ctx.x_shape, ctx.w_dtype = x.shape, weight.dtype
        return y2.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        from .rmsnorm_triton import norm_bwd, row_reduce

        x2, w, r = ctx.saved_tensors
        dy2 = as_rows(dy)
        c = _reduced(row_reduce(x2, dy2, w), ctx.all_reduce)
        dx2, dw = norm_bwd(x2, dy2, w, r, c, ctx.full_width)
        return dx2.view(ctx.x_shape), dw.to(ctx.w_dtype), None, None, None


def tp_rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    full_width: int,
    all_reduce: AllReduce | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """RMSNorm of ``x`` ``[..., n]`` over the full TP width ``full_width`` (see the module
    docstring); ``[..., n]`` in ``x``'s dtype. Any leading shape; rows may be strided (a unit
    last stride avoids a copy)."""
    if x.dim() == 0 or weight.shape != x.shape[-1:]:
        raise ValueError(
            f"tp_rmsnorm needs x [..., n] and weight [n]; got {tuple(x.shape)}, "
            f"{tuple(weight.shape)}"
        )
    if not use_triton(x, backend, "rmsnorm"):
        return tp_rmsnorm_torch(x, weight, eps, full_width, all_reduce)
    return _TPRMSNorm.apply(x, weight, float(eps), int(full_width), all_reduce)
