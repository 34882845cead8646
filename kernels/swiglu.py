"""SwiGLU of a fused ``[gate | linear]`` projection: ``silu(x[..., :F]) * x[..., F:]``.

This is megatron-core's gated-linear-unit activation (``MLP.forward``'s ``glu`` with
``activation_func=F.silu``, no clamp, no linear offset) applied to the column-parallel fc1
output; each tensor-parallel rank holds its own ``[gate_r | linear_r]`` halves, so the function
is purely local.

Why a kernel: run eagerly (megatron's fused version is a ``torch.compile`` function, off under
``TORCHDYNAMO_DISABLE=1``) the activation is ~6 elementwise kernels each way over
``[tokens, F]`` on the strided ``torch.chunk`` halves (silu, mul; sigmoid, muls, a copy into
the ``[.., 2F]`` gradient), ~20-25 ms per step at 7B width and 8192 tokens. Here:

- forward: one pass, reads both halves, float32 arithmetic, writes ``[..., F]`` in ``x``'s dtype;
- backward: one pass, reads ``x`` and the output gradient, recomputes the sigmoid, writes the
  whole ``[..., 2F]`` input gradient into one buffer. Only ``x`` is saved (the fc1 output, which
  megatron's eager path keeps too, plus the silu output that we do not keep).

``backend``: "triton", "torch", or "auto" (Triton for CUDA tensors or under TRITON_INTERPRET=1
when Triton is importable, else torch). The torch path is megatron's eager ``glu`` op for op
(``torch.chunk``, ``F.silu``, ``*`` in the input dtype, plain autograd), hence also HF
transformers' ``act_fn(gate_proj(x)) * up_proj(x)``: bit-identical to what the model computed
before this kernel existed, for every dtype. The Triton path rounds once from float32, so in
bf16 it differs from the torch path by bf16 rounding (it is the more accurate of the two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import use_triton
from .rows import as_rows


def swiglu_torch(x: torch.Tensor) -> torch.Tensor:
    """megatron-core's eager ``glu`` (F.silu, no clamp/offset): the reference and CPU path."""
    x_glu, x_linear = torch.chunk(x, 2, dim=-1)
    return F.silu(x_glu) * x_linear


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        from .swiglu_triton import swiglu_fwd_triton

        two_f = x.shape[-1]
        x2 = as_rows(x)
        y = swiglu_fwd_triton(x2)
        ctx.save_for_backward(x2)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], two_f // 2)

    @staticmethod
    def backward(ctx, dy):
        from .swiglu_triton import swiglu_bwd_triton

        (x2,) = ctx.saved_tensors
        dy2 = as_rows(dy)
        return swiglu_bwd_triton(x2, dy2).view(ctx.x_shape)


def swiglu(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``silu(x[..., :F]) * x[..., F:]`` for ``x`` of shape ``[..., 2F]``; ``[..., F]`` in
    ``x``'s dtype. Any leading shape and strides (a unit last stride avoids a copy)."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension [..., 2F]; got {tuple(x.shape)}")
    if not use_triton(x, backend, "swiglu"):
        return swiglu_torch(x)
    if (rows := x.shape[:-1].numel()) >= 2**31:
        raise ValueError(f"swiglu: {rows} rows exceed one launch (2**31 - 1 programs)")
    return _SwiGLU.apply(x)
