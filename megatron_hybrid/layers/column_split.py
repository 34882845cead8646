"""One autograd op for cutting per-head rows into contiguous column parts (layers/gdn.py and
layers/attention.py); the copies are kernels/split_columns.py."""

from __future__ import annotations

import torch

from megatron_hybrid.kernels.split_columns import merge_columns, split_columns


class SplitColumnsPerHead(torch.autograd.Function):
    """``x [b, s, H, P]`` -> contiguous parts ``[b, s, H, w]`` per head (``widths`` summing to P;
    kernels/split_columns.py: one Triton pass each way on GPU instead of torch's strided copies).

    Plain slicing would give the same forward, but its backward zero-fills a full-width gradient
    for each slice and adds them up: extra passes over the layer's widest activations. Here the
    backward writes each part's gradient once into one uninitialised buffer (zeros for a part
    that got none).

    Used by the GDN layer, twice: the projection ``[q | k | v | gate]`` -> ``([q | k | v], gate)``,
    both copies so that the projection itself is freed at once (a gate *view*, read by the
    gated norm in the backward, kept the whole projection alive next to the conv's qkv copy: 23
    KB per token per GDN layer at 7B widths for a 2.5 KB/token extra write); and the conv output
    ``[q | k | v]`` -> q, k, v, which the recurrence kernels read contiguous. And by Olmo
    attention: its fused QKV output per KV group ``[q (r heads) | k | v]`` -> q, k, v (the
    QK-norm kernel and the attention core read them contiguous)."""

    @staticmethod
    def forward(ctx, x, widths: tuple[int, ...], backend: str):
        b, s, H, P = x.shape  # any 4-D [.., .., heads, P] layout ([s, b, G, P] too)
        ctx.widths, ctx.shape, ctx.dtype, ctx.backend = widths, x.shape, x.dtype, backend
        # an unused part's gradient arrives as None (not a zero tensor to read): merge writes zeros
        ctx.set_materialize_grads(False)
        parts = split_columns(x.reshape(b * s * H, P), widths, backend=backend)
        return tuple(part.view(b, s, H, w) for part, w in zip(parts, widths, strict=True))

    @staticmethod
    def backward(ctx, *grads):
        b, s, H, P = ctx.shape
        rows = b * s * H
        dev = next(g for g in grads if g is not None).device
        parts = [
            None if g is None else g.reshape(rows, w)
            for g, w in zip(grads, ctx.widths, strict=True)
        ]
        grad = merge_columns(parts, ctx.widths, ctx.dtype, dev, backend=ctx.backend)
        return grad.view(ctx.shape), None, None
