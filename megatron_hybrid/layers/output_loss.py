"""The LM head and the loss in one chunked pass: the ``[tokens, vocab]`` logits never exist whole.

Why: at 100,352 vocabulary entries the logits are the largest activation of the model -- 12.3
GiB in bf16 at 64K tokens, more than every GDN layer's saved activations together -- although
nothing but the loss reads them. Here the final hidden states are cut into chunks of
``chunk_tokens`` rows; for each chunk the forward computes its logits, the cross entropy + z-loss
(the same vocab-parallel kernel as ``kernels/cross_entropy.py``), their gradient in place, the
chunk's input gradient and its share of the weight gradient, then drops the logits. Peak memory
is one chunk of logits; the GEMM work is the same as the unfused head's (forward, dgrad, wgrad).

The gradients are computed in the forward, so the loss is the *sum* over tokens of
``mask * (ce + z_coeff * z)`` and the backward only scales what the forward prepared by the
incoming scalar. The weight gradient goes straight into megatron's fp32 ``main_grad`` buffer
(Transformer Engine's accumulating GEMM, the same fusion TE linears use) when the weight has
one: that needs the incoming gradient to be exactly 1, the trainer's bf16 / fp32 case (megatron's
loss scale is the constant 1 there; fp16's dynamic loss scale keeps the unfused head). Without
``main_grad`` (plain PyTorch use, tests) it is accumulated in fp32 and returned as the weight's
``.grad``, scaled like the input gradient.

Tensor parallelism is megatron's ColumnParallelLinear's: the hidden states are all-gathered
from the sequence-parallel shards (their gradient reduce-scattered) or copied to every TP rank
(gradient all-reduced); each rank holds a vocabulary slice and the loss statistics are combined
over TP per chunk with the kernel's fixed-order collectives, the same number of chunks on every
rank whatever the data.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_hybrid import mcore
from megatron_hybrid.kernels.cross_entropy import global_row_stats, logits_grad
from megatron_hybrid.kernels.dispatch import use_triton

DEFAULT_CHUNK_TOKENS = 8192


def _accumulate_wgrad(buf: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
    """``buf += dlogits^T h`` (``buf`` [V, D] in fp32 or the weight's dtype)."""
    gemm = mcore.te_accumulating_gemm() if buf.is_cuda else None
    if gemm is not None and dlogits.dtype in (torch.bfloat16, torch.float16):
        gemm(h, dlogits, layout="NT", out=buf, out_dtype=buf.dtype, accumulate=True, grad=True)
    elif dlogits.dtype == buf.dtype:
        buf.addmm_(dlogits.t(), h)
    else:  # 16-bit GEMM without TE: the chunk's product rounds once, then an fp32 add
        buf.add_(torch.mm(dlogits.t(), h))


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, ce_w, z_w, group, vocab_start, chunk, triton, grads):
        n = hidden.shape[0]
        v = weight.shape[0]
        local_t = target - vocab_start
        in_range = (local_t >= 0) & (local_t < v)
        ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
        z = torch.empty_like(ce)
        into_main = grads and getattr(weight, "main_grad", None) is not None
        grad_h = torch.empty_like(hidden) if grads else None
        wbuf = None
        if grads:
            wbuf = (
                weight.main_grad
                if into_main
                else torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            )
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            h = hidden[a:b]
            logits = torch.mm(h, weight.t())
            lt, ir = local_t[a:b], in_range[a:b]
            lse, picked = global_row_stats(logits, lt, ir, group, triton)
            ce[a:b] = lse - picked
            z[a:b] = lse * lse
            if grads:
                gce = ce_w[a:b].float().contiguous()
                scale = (gce + 2.0 * lse * z_w[a:b].float()).contiguous()
                logits_grad(logits, lse, scale, gce, lt, ir, logits, triton)
                torch.mm(logits, weight, out=grad_h[a:b])
                _accumulate_wgrad(wbuf, logits, h)
            del logits
        loss = (ce * ce_w.float() + z * z_w.float()).sum()
        ctx.into_main, ctx.weight_dtype = into_main, weight.dtype
        ctx.weight = weight if into_main else None
        ctx.save_for_backward(grad_h, None if into_main else wbuf)
        ctx.mark_non_differentiable(ce, z)
        return loss, ce, z

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_z):
        grad_h, wbuf = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError(
                "chunked LM head + loss: backward of a forward run without gradients"
            )
        grad_h = grad_h * g_loss.to(grad_h.dtype)
        if ctx.into_main:
            # the gradient is in main_grad already (the incoming scalar is the trainer's
            # constant 1, see the module docstring); megatron's DDP hook needs a .grad to fire
            # on, and grad_added_to_main_grad tells it not to add this placeholder
            w = ctx.weight
            w.grad_added_to_main_grad = True
            grad_w = torch.empty(w.main_grad.shape, dtype=w.dtype, device=w.device)
        else:
            grad_w = (wbuf * g_loss.float()).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def lm_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ce_weight: torch.Tensor,
    z_weight: torch.Tensor,
    tp_group=None,
    *,
    sequence_parallel: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    backend: str = "auto",
):
    """``(loss, ce, z)``: ``loss = sum(ce_weight * ce + z_weight * z)`` over tokens (the only
    differentiable output), ``ce`` / ``z`` per token in fp32 (for reports).

    ``hidden``: ``[s, b, D]`` final hidden states as the output layer would read them (``s``
    this rank's sequence shard under sequence parallelism); ``weight``: ``[V_local, D]``, this TP
    rank's vocabulary slice; ``target``, ``ce_weight``, ``z_weight``: ``[s_full, b]`` (the whole
    sequence, gathered order) global token ids and per-token loss weights."""
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    if group is not None:
        if sequence_parallel:
            hidden = mcore.gather_from_sequence_parallel_region(hidden, True, group=group)
        else:
            hidden = mcore.copy_to_tensor_model_parallel_region(hidden, group=group)
    s, b, d = hidden.shape
    if target.shape != (s, b):
        raise ValueError(f"targets {tuple(target.shape)} do not match hidden states {(s, b, d)}")
    rows = hidden.reshape(s * b, d)
    rank = dist.get_rank(group) if group is not None else 0
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedHeadLoss.apply(
        rows,
        weight,
        target.reshape(-1),
        ce_weight.reshape(-1),
        z_weight.reshape(-1),
        group,
        rank * weight.shape[0],
        max(1, int(chunk_tokens)),
        use_triton(rows, backend, "cross-entropy"),
        grads,
    )


@contextlib.contextmanager
def deferred_logits(model_chunks):
    """Within this context the last pipeline stage's output layer hands back its input (the
    final hidden states ``[s, b, D]``) instead of logits, so megatron's model returns
    ``[b, s, D]`` hidden states and the loss applies :func:`lm_head_loss` with the layer's
    weight. Other callers of the model (generation, accuracy tests) get logits as usual."""
    layers = [c for c in (output_layer_of(m) for m in model_chunks) if c is not None]
    for layer in layers:
        if not hasattr(layer, "_defer_logits"):
            _install(layer)
        layer._defer_logits = True
    try:
        yield
    finally:
        for layer in layers:
            layer._defer_logits = False


def output_layer_of(model_chunk):
    """The output layer (megatron's ColumnParallelLinear) of a model chunk inside its DDP /
    Float16Module wrappers, or None (not the last pipeline stage)."""
    m = model_chunk
    while not hasattr(m, "output_layer") and hasattr(m, "module"):
        m = m.module
    return getattr(m, "output_layer", None)


def _install(layer) -> None:
    """Wraps the layer's forward once: pass-through while ``_defer_logits`` is set."""
    original = layer.forward

    def forward(hidden_states, *args, **kwargs):
        if layer._defer_logits:
            return hidden_states, None
        return original(hidden_states, *args, **kwargs)

    layer.forward = forward
