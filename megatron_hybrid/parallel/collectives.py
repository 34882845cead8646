"""Tensor-parallel collectives whose autograd is right for statistics shared across TP ranks.

megatron-core's ``reduce_from_tensor_model_parallel_region`` all-reduces forward and passes the
gradient through unchanged. That is right when what follows is replicated on every rank, but
wrong for a *statistic* (e.g. the sum of squares of Olmo's full-width QK-norm) whose consumers
differ per rank (each rank normalises its own heads with it): then every rank's gradient
contribution must be summed as well. ``all_reduce_sum`` does both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum ``x`` over ``group`` (forward and backward). Identity for a 1-rank group."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)
