"""The optimizer step with one host synchronisation: gradient norm, NaN/inf check, clipping.

megatron's ``optimizer.step()`` computes the gradient norm, clips with it and updates -- also
when the norm is NaN (a NaN clip coefficient compares false with 1.0, so nothing is clipped and
NaN flows into the weights). Checking first used to take a separate pass over all gradients and
two more host syncs. Here the norm is computed once on the device, reduced over the same group
megatron uses, and brought to the host together with the step's loss report in ONE copy; the
update runs only when both are finite, clipping with that same norm.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_hybrid import mcore


def _parts(optimizer) -> list:
    """The underlying megatron optimizers (a ChainedOptimizer holds one per param group)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _squared_grad_norm(optimizer, device) -> torch.Tensor:
    """Sum of squares of every gradient that counts for the norm, reduced over the grad-stats
    group (model-parallel ranks; with the distributed optimizer also its DP shards), on device.
    megatron's ``get_grads_for_grad_norm`` drops TP-duplicated parameters so that replicated
    tensors (norm weights) count once."""
    parts = _parts(optimizer)
    grads = [g for p in parts for g in p.get_grads_for_grad_norm()]
    if grads:
        norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
        sq = torch.stack(norms).square().sum()
    else:
        sq = torch.zeros((), device=device)
    sq = sq.to(device=device, dtype=torch.float32).reshape(1)
    dist.all_reduce(sq, group=parts[0].get_grad_stats_parallel_group())
    return sq


def step_if_finite(optimizer, report: torch.Tensor, clip_grad: float):
    """Run the update when the gradient norm and the loss report are finite.

    ``report``: the step's device tensor ``[ce sum, z sum, tokens, ...]``, already reduced over
    ranks. Returns ``(updated, grad_norm, report on the host)``; the only host sync is the copy
    of ``[norm^2, *report]``."""
    found_inf = optimizer.prepare_grads()  # False without a loss scaler (bf16 / fp32)
    sq = _squared_grad_norm(optimizer, report.device)
    host = torch.cat([sq.double(), report.double()]).cpu()
    grad_norm = math.sqrt(host[0].item()) if host[0].item() >= 0 else float("nan")
    report_h = host[1:]
    ok = (
        not found_inf
        and math.isfinite(grad_norm)
        and math.isfinite(report_h[0].item())
        and math.isfinite(report_h[1].item())
    )
    if ok:
        if clip_grad > 0:
            for part in _parts(optimizer):
                params = part.get_parameters()
                if params:
                    mcore.clip_grad_by_total_norm_fp32(
                        params,
                        clip_grad,
                        grad_norm,
                        use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                    )
        ok = bool(optimizer.step_with_ready_grads())
    return ok, grad_norm, report_h
