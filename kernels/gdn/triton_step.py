"""Single-token Gated DeltaNet step (decode) in Triton, forward only.

Per head, with state ``S`` [K, V]::

    S <- exp(g) S;  v_new = beta (v - S^T k);  S <- S + k v_new^T;  o = scale S^T q

(q, k optionally L2-normalised first, ``x * rsqrt(sum(x^2) + 1e-6)``). One program owns a V-slice
of one (batch, head) state and keeps all of K, so the L2 norms and every reduction stay inside
it: no atomics, deterministic.
"""

# legend: B batch, H heads, K key dim, V value dim, KP K padded to a power of 2, BV V slice

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from .triton_chunk import _module_in_mode, _pow2

_INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _sum0(x):
    # tl.reduce with triton's sum combiner instead of tl.sum (see triton_chunk's note)
    return tl.reduce(x, 0, tl.standard._sum_combine)


@triton.jit
def _step_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, S_ptr, o_ptr, S_out_ptr, scale,
    K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr,
):  # fmt: skip
    v0 = tl.program_id(0) * BV
    bh = tl.program_id(1).to(tl.int64)  # b * H + h
    k_K = tl.arange(0, KP)
    v_V = v0 + tl.arange(0, BV)
    k_mask = k_K < K
    v_mask = v_V < V
    q_K = tl.load(q_ptr + bh * K + k_K, mask=k_mask, other=0.0).to(tl.float32)
    k_K_vals = tl.load(k_ptr + bh * K + k_K, mask=k_mask, other=0.0).to(tl.float32)
    if L2NORM:
        q_K = q_K / tl.sqrt(_sum0(q_K * q_K) + 1e-6)
        k_K_vals = k_K_vals / tl.sqrt(_sum0(k_K_vals * k_K_vals) + 1e-6)
    q_K = q_K * scale
    v_V_vals = tl.load(v_ptr + bh * V + v_V, mask=v_mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + bh).to(tl.float32)
    beta = tl.load(beta_ptr + bh).to(tl.float32)

    S_offs = bh * (K * V) + k_K[:, None] * V + v_V[None, :]
    S_mask = k_mask[:, None] & v_mask[None, :]
    S_KV = tl.load(S_ptr + S_offs, mask=S_mask, other=0.0).to(tl.float32) * tl.exp(g)
    pred_V = _sum0(S_KV * k_K_vals[:, None])
    vnew_V = beta * (v_V_vals - pred_V)
    S_KV = S_KV + k_K_vals[:, None] * vnew_V[None, :]
    o_V = _sum0(S_KV * q_K[:, None])
    tl.store(o_ptr + bh * V + v_V, o_V.to(o_ptr.dtype.element_ty), mask=v_mask)
    tl.store(S_out_ptr + S_offs, S_KV, mask=S_mask)


def fused_recurrent_gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of the gated delta rule.

    Args:
        q, k: ``[B, 1, H, K]`` or ``[B, H, K]``; v: ``[B, 1, H, V]`` or ``[B, H, V]``.
        g, beta: ``[B, 1, H]`` or ``[B, H]`` (log decay, delta-rule rate).
        state: ``[B, H, K, V]`` (float32 recommended) or None for zeros.
        scale: output scale, default ``K ** -0.5``.
        use_qk_l2norm_in_kernel: L2-normalise q and k per head first.
        inplace: write the new state into ``state`` (must then be a contiguous float32 tensor).

    Returns:
        ``(o, new_state)``: o ``[B, 1, H, V]`` or ``[B, H, V]`` (like q) in q.dtype, and the
        float32 ``[B, H, K, V]`` state after the token.

    CUDA tensors run the compiled kernel; CPU tensors run it in Triton's interpreter.
    """
    impl = _module_in_mode(sys.modules[__name__], interpret=not q.is_cuda)
    return impl._step(q, k, v, g, beta, state, scale, use_qk_l2norm_in_kernel, inplace)


def _step(q, k, v, g, beta, state, scale, use_qk_l2norm_in_kernel, inplace):
    squeeze = q.dim() == 3
    if q.dim() == 4:
        if q.shape[1] != 1:
            raise ValueError(f"decode step takes one token: q must be [B, 1, H, K], got {q.shape}")
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        g, beta = g[:, 0], beta[:, 0]
    if q.dim() != 3:
        raise ValueError(f"q must be [B, 1, H, K] or [B, H, K], got {tuple(q.shape)}")
    B, H, K = q.shape
    V = v.shape[-1]
    if k.shape != (B, H, K) or v.shape != (B, H, V):
        raise ValueError(f"k must be {(B, H, K)} and v [B, H, V], got {k.shape}, {v.shape}")
    if g.shape != (B, H) or beta.shape != (B, H):
        raise ValueError(f"g and beta must be [B, H] = {(B, H)}, got {g.shape}, {beta.shape}")
    if state is not None and state.shape != (B, H, K, V):
        raise ValueError(f"state must be [B, H, K, V] = {(B, H, K, V)}, got {state.shape}")
    if not (K <= 256 and V <= 256):
        raise ValueError(f"triton GDN step supports K, V <= 256, got K={K}, V={V}")
    if scale is None:
        scale = K**-0.5
    if state is None:
        state = torch.zeros(B, H, K, V, device=q.device, dtype=torch.float32)
    if inplace:
        if state.dtype != torch.float32 or not state.is_contiguous():
            raise ValueError("inplace=True needs a contiguous float32 state")
        state_in, state_out = state, state
    else:
        state_in = state.contiguous()
        state_out = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
    o = torch.empty(B, H, V, device=q.device, dtype=q.dtype)
    KP = _pow2(K)
    BV = min(_pow2(V), 64 if KP <= 64 else 32)
    _step_kernel[(triton.cdiv(V, BV), B * H)](
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(),
        state_in, o, state_out, float(scale),
        K=K, V=V, KP=KP, BV=BV, L2NORM=bool(use_qk_l2norm_in_kernel), num_warps=4,
    )  # fmt: skip
    return (o if squeeze else o.unsqueeze(1)), state_out
