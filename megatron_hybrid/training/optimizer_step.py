"""The optimizer step with one host synchronisation: gradient norm, NaN/inf check, clipping.

megatron's ``optimizer.step()`` computes the gradient norm, clips with it and updates -- also
when the norm is NaN (a NaN clip coefficient compares false with 1.0, so nothing is clipped and
NaN flows into the weights). Checking first used to take a separate pass over all gradients and
two more host syncs. Here the norm is computed once on the device, reduced over the same group
megatron uses, and brought to the host together with the step's loss report in ONE copy; the
update runs only when both are finite, clipping with that same norm.

The per-token normalisation (the loss is a sum over tokens, divided by the global token count)
is folded into the same pass: megatron's ``finalize_model_grads`` would multiply the whole
gradient buffer by 1/tokens (on a > 2**31-element buffer torch takes its slow 64-bit-index
path: 14 ms per step at 7B-proxy widths on the H100) and the clip would then scale it again.
Here ``finalize_grads_unscaled`` leaves the sums, the norm is taken of the sums and divided by
the token count from the step's report, and one ``_foreach_mul_`` applies ``clip / tokens``.
"""

from __future__ import annotations

import contextlib
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


def finalize_grads_unscaled(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """megatron's ``finalize_model_grads`` (DP/CP all-reduce, SP norm grads, tied embeddings)
    without its division by the token count; ``step_if_finite`` divides (one pass with the
    clip). Installed as ``TransformerConfig.finalize_model_grads_func``."""
    mcore.finalize_model_grads(
        model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce
    )


def _optimizer_grads(optimizer) -> list[torch.Tensor]:
    """The gradients the update reads (main params' grads, or TE's decoupled grads)."""
    out = []
    for part in _parts(optimizer):
        decoupled = part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
        for p in part.get_parameters():
            g = getattr(p, "decoupled_grad", None) if decoupled else p.grad
            if g is not None:
                out.append(g)
    return out


@contextlib.contextmanager
def fp8_weight_cast_rowwise_only(optimizer):
    """With FP8 weights (``--fp8-param-gather``): while the distributed optimizer casts the
    updated master shards into the FP8 parameters, their quantizers write the row-wise FP8 data
    only.

    Why: with FP8 weights the H100 profile spent 121 ms per step at 7B-proxy widths in TE's
    unvectorised ``cast_transpose_general_kernel`` outside every module (BENCHMARKS.md). TE's
    master-weight cast quantizes each shard as a ``[1, N]`` row, so a quantizer that also asks
    for the column-wise (transposed) copy has TE transpose a 1 x N row. With this context the
    kernel is gone from the profile (step 316 -> 211 ms, H100, 2026-12-06). That copy is not
    needed: megatron's
    post-all-gather processing rebuilds every weight's transpose from the whole 2-D weight right
    after. The usages are restored on exit. A no-op without FP8 weights."""
    saved = []
    for part in _parts(optimizer):
        ddp = getattr(part, "ddp_config", None)
        if ddp is None or not getattr(ddp, "fp8_param_gather", False):
            continue
        for buffer in getattr(part, "buffers", []):
            for p in buffer.params:
                q = getattr(p, "_quantizer", None)
                if type(p).__name__ != "Float8Tensor" or q is None or not hasattr(q, "set_usage"):
                    continue
                saved.append((q, q.rowwise_usage, q.columnwise_usage))
                q.set_usage(rowwise=True, columnwise=False)
    try:
        yield
    finally:
        for q, rowwise, columnwise in saved:
            q.set_usage(rowwise=rowwise, columnwise=columnwise)


def step_if_finite(optimizer, report: torch.Tensor, clip_grad: float):
    """Run the update when the gradient norm and the loss report are finite.

    ``report``: the step's device tensor ``[ce sum, z sum, tokens, ...]``, already reduced over
    ranks; the gradients are sums over those tokens (``finalize_grads_unscaled``). Returns
    ``(updated, grad_norm, report on the host)``, the norm being that of the per-token mean
    gradient (what megatron reports); the only host sync is the copy of ``[norm^2, *report]``."""
    found_inf = optimizer.prepare_grads()  # False without a loss scaler (bf16 / fp32)
    sq = _squared_grad_norm(optimizer, report.device)
    host = torch.cat([sq.double(), report.double()]).cpu()
    report_h = host[1:]
    tokens = max(report_h[2].item(), 1.0)
    sq_h = host[0].item()
    grad_norm = math.sqrt(sq_h) / tokens if sq_h >= 0 else float("nan")
    ok = (
        not found_inf
        and math.isfinite(grad_norm)
        and math.isfinite(report_h[0].item())
        and math.isfinite(report_h[1].item())
    )
    if ok:
        clip = min(1.0, clip_grad / (grad_norm + 1e-6)) if clip_grad > 0 else 1.0
        grads = _optimizer_grads(optimizer)
        if grads:
            torch._foreach_mul_(grads, clip / tokens)
        with fp8_weight_cast_rowwise_only(optimizer):
            ok = bool(optimizer.step_with_ready_grads())
    return ok, grad_norm, report_h
