"""Vocab-parallel cross entropy fused with the z-loss.

Shapes: logits ``[s, b, V_local]`` (this TP rank's vocabulary slice), target ``[s, b]``.
Per token: ``ce = lse - logit[target]`` and ``z = lse^2`` with ``lse = logsumexp(all logits)``;
the returned loss is ``ce + z_coeff * z``. Olmo trains with z_coeff = 1e-5 (keeps the softmax
normaliser near 1, which keeps bf16 logits well-conditioned). Both terms come from one pass over
the logits, and backward is ``softmax * (1 + 2 z_coeff lse) - onehot(target)`` times the
incoming gradient — no second copy of the logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _CrossEntropyZLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, z_coeff: float, group, vocab_start: int):
        logits = logits.float()
        vocab_local = logits.shape[-1]
        m = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        exp = torch.exp(logits - m.unsqueeze(-1))
        sum_exp = exp.sum(-1)
        local_t = target - vocab_start
        in_range = (local_t >= 0) & (local_t < vocab_local)
        picked = torch.gather(logits, -1, local_t.clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(
            -1
        )
        picked = torch.where(in_range, picked, torch.zeros_like(picked))
        if group is not None:
            dist.all_reduce(sum_exp, group=group)
            dist.all_reduce(picked, group=group)
        lse = torch.log(sum_exp) + m
        ce = lse - picked
        z = lse * lse
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, reused by backward
        ctx.save_for_backward(exp, lse, local_t, in_range)
        ctx.z_coeff = z_coeff
        return ce, z

    @staticmethod
    def backward(ctx, grad_ce, grad_z):
        softmax, lse, local_t, in_range = ctx.saved_tensors
        # d ce / d logits = softmax - onehot; d z / d logits = 2 lse softmax
        scale = grad_ce + 2.0 * lse * grad_z
        grad = softmax * scale.unsqueeze(-1)
        onehot_grad = torch.where(in_range, grad_ce, torch.zeros_like(grad_ce))
        idx = local_t.clamp(0, softmax.shape[-1] - 1).unsqueeze(-1)
        grad.scatter_add_(-1, idx, -onehot_grad.unsqueeze(-1))
        return grad, None, None, None, None


def cross_entropy_with_z_loss(logits, target, z_coeff: float = 0.0, tp_group=None):
    """Return ``(ce [s,b], z [s,b])`` in fp32; combine as ``ce + z_coeff * z`` (z_coeff is only
    used to choose the backward scale of z: pass the same coefficient you use)."""
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    vocab_start = rank * logits.shape[-1]
    return _CrossEntropyZLoss.apply(logits, target, z_coeff, tp_group, vocab_start)
