"""Vocab-parallel cross entropy + z-loss that reads the logits in their own dtype and writes their
gradient in place.

Shapes: logits ``[N, V_local]`` (rows = tokens, this tensor-parallel rank's vocabulary slice,
last dim contiguous), target ``[N]`` (global vocabulary ids). Per token::

    lse = logsumexp(all logits of the row, over every TP rank)
    ce  = lse - logit[target]            z = lse ** 2

The gradient of ``grad_ce * ce + grad_z * z`` with respect to a logit is
``softmax * (grad_ce + 2 lse grad_z) - grad_ce * onehot(target)``.

Why a kernel: the plain PyTorch version upcasts the [tokens, vocab] logits to fp32 and keeps an
fp32 softmax for the backward -- two extra copies of the largest activation of the model (13 GB
each at 32K tokens x 100K vocab) and ~8 full passes over it. Here the forward is one read of the
logits producing three fp32 numbers per row (running max, sum of exponentials relative to it, the
target's logit), and the backward is one read + one in-place write that recomputes the softmax
from the saved ``lse``. Peak memory beyond the logits themselves is O(tokens).

Tensor parallelism: per-row statistics are combined over the TP group with three all-reduces in
a fixed order (max, rescaled sum, picked logit) -- the same on every rank whatever the data.

``backend``: "torch" (reference, also the CPU path), "triton", or "auto" (Triton for CUDA tensors
or under TRITON_INTERPRET=1, else torch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .dispatch import use_triton

# ---- per-row statistics ---------------------------------------------------------------------


def _row_stats_torch(logits, local_t, in_range):
    """(max, sum exp(x - max), picked logit) per row, fp32, chunked over rows so that the fp32
    upcast never holds more than a slice of the logits."""
    n, v = logits.shape
    m = torch.empty(n, dtype=torch.float32, device=logits.device)
    s = torch.empty_like(m)
    rows = max(1, (1 << 26) // max(v, 1))  # ~256 MB of fp32 per slice
    for a in range(0, n, rows):
        x = logits[a : a + rows].float()
        mx = x.max(dim=-1).values
        m[a : a + rows] = mx
        # a row slice of only -inf (masked vocabulary on this TP rank) has sum 0, not nan
        s[a : a + rows] = torch.exp(x - torch.where(mx.isinf(), 0.0, mx)[:, None]).sum(-1)
    picked = torch.gather(logits, 1, local_t.clamp(0, v - 1)[:, None])[:, 0].float()
    picked = torch.where(in_range, picked, torch.zeros_like(picked))
    return m, s, picked


def _grad_torch(logits, lse, scale, grad_ce, local_t, in_range, out):
    n, v = logits.shape
    rows = max(1, (1 << 26) // max(v, 1))
    for a in range(0, n, rows):
        x = logits[a : a + rows].float()
        g = torch.exp(x - lse[a : a + rows, None]) * scale[a : a + rows, None]
        out[a : a + rows] = g.to(out.dtype)
    hit = torch.nonzero(in_range).squeeze(-1)
    cols = local_t[hit]
    out[hit, cols] = (out[hit, cols].float() - grad_ce[hit]).to(out.dtype)
    return out


def _combine_over_tp(m, s, picked, group):
    """Global (lse, picked) from per-rank row statistics; collectives in a fixed order."""
    if group is not None:
        m_global = m.clone()
        dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=group)
        # a rank whose slice is all -inf has s = 0 and m = -inf: exp(-inf - m) = 0 keeps it out
        s = s * torch.exp(m - m_global)
        dist.all_reduce(s, group=group)
        dist.all_reduce(picked, group=group)
        m = m_global
    return torch.log(s) + m, picked


def global_row_stats(logits, local_t, in_range, group, use_triton: bool):
    """``(lse, picked logit)`` per row of ``logits [N, V_local]`` over the whole (TP-split)
    vocabulary, fp32. ``local_t``: targets minus this rank's first vocabulary id; ``in_range``:
    whether the target is on this rank. Issues the TP collectives (same order on every rank)."""
    if use_triton:
        from .cross_entropy_triton import row_stats_triton

        m, s, picked = row_stats_triton(logits, local_t, in_range)
    else:
        m, s, picked = _row_stats_torch(logits, local_t, in_range)
    return _combine_over_tp(m, s, picked, group)


def logits_grad(logits, lse, scale, grad_ce, local_t, in_range, out, use_triton: bool):
    """Writes ``softmax * scale - grad_ce * onehot(target)`` per row into ``out`` (may be
    ``logits`` itself): the gradient of ``grad_ce * ce + grad_z * z`` with
    ``scale = grad_ce + 2 lse grad_z`` (fp32, per row)."""
    if use_triton:
        from .cross_entropy_triton import grad_triton

        grad_triton(logits, lse, scale, grad_ce, local_t, in_range, out)
    else:
        _grad_torch(logits, lse, scale, grad_ce, local_t, in_range, out)
    return out


class _CrossEntropyZLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, use_triton, inplace_backward):
        n, v = logits.shape
        local_t = target - vocab_start
        in_range = (local_t >= 0) & (local_t < v)
        lse, picked = global_row_stats(logits, local_t, in_range, group, use_triton)
        ctx.save_for_backward(logits, lse, local_t, in_range)
        ctx.use_triton, ctx.inplace_backward = use_triton, inplace_backward
        return lse - picked, lse * lse

    @staticmethod
    def backward(ctx, grad_ce, grad_z):
        logits, lse, local_t, in_range = ctx.saved_tensors
        grad_ce = grad_ce.float().contiguous()
        scale = (grad_ce + 2.0 * lse * grad_z.float()).contiguous()
        # The logits are dead after this (nothing else reads the model's output), so their
        # buffer takes the gradient: no second [tokens, vocab] allocation.
        out = logits if ctx.inplace_backward else torch.empty_like(logits)
        logits_grad(logits, lse, scale, grad_ce, local_t, in_range, out, ctx.use_triton)
        return out, None, None, None, None, None


def cross_entropy_with_z_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group=None,
    backend: str = "auto",
    inplace_backward: bool = False,
):
    """Per-token ``(ce, z)`` in fp32 with the shape of ``target``; combine as
    ``ce + z_coeff * z``.

    ``logits``: ``[..., V_local]`` with a contiguous last dim (any float dtype; read as is);
    ``target``: ``[...]`` global token ids. ``tp_group``: the tensor-parallel group over which
    the vocabulary is split (rank r holds ids ``[r V_local, (r + 1) V_local)``); None or a
    1-rank group = the whole vocabulary is local. ``inplace_backward=True`` writes the logits'
    gradient into the logits' own storage: pass it only when nothing else reads the logits
    after the loss (the trainer's case).
    """
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    v = logits.shape[-1]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    flat = logits.reshape(-1, v)  # a view for the usual [s, b, V] / [b, s, V] layouts
    shape = target.shape
    ce, z = _CrossEntropyZLoss.apply(
        flat,
        target.reshape(-1),
        tp_group,
        rank * v,
        use_triton(logits, backend, "cross-entropy"),
        inplace_backward,
    )
    return ce.view(shape), z.view(shape)
