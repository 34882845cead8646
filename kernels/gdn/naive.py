"""Ground-truth token-by-token Gated DeltaNet recurrence (float64, slow, differentiable).

Per head, with state ``S`` of shape ``[K, V]``::

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

which is computed in the equivalent "delta" form::

    S = S * exp(g_t);  v_new = beta_t * (v_t - S^T k_t);  S = S + k_t v_new^T;  o_t = scale * S^T q_t

This is the reference every other backend is tested against; it is not meant to be fast.
"""

from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """``x * rsqrt(sum(x * x) + eps)`` along ``dim``.

    ``eps`` is added to the sum of squares inside the rsqrt (not to the norm), matching the
    qk-l2norm of flash-linear-attention and HF transformers.
    """
    return x * torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + eps)


def _recurrence(
    q_TBHK: torch.Tensor,
    k_TBHK: torch.Tensor,
    v_TBHV: torch.Tensor,
    g_TBH: torch.Tensor,
    beta_TBH: torch.Tensor,
    state_BHKV: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence over the leading time axis; returns (o [T, B, H, V], final state)."""
    # legend: T time, B batch, H heads, K key dim, V value dim
    outs = []
    for t in range(q_TBHK.shape[0]):
        state_BHKV = state_BHKV * g_TBH[t].exp()[..., None, None]
        k_BHK = k_TBHK[t]
        pred_BHV = torch.einsum("bhkv,bhk->bhv", state_BHKV, k_BHK)
        v_new_BHV = beta_TBH[t][..., None] * (v_TBHV[t] - pred_BHV)
        state_BHKV = state_BHKV + k_BHK[..., :, None] * v_new_BHV[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", state_BHKV, q_TBHK[t]))
    if outs:
        o_TBHV = torch.stack(outs, dim=0)
    else:
        o_TBHV = v_TBHV.new_zeros(v_TBHV.shape)
    return o_TBHV, state_BHKV


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference gated delta rule, one token at a time, computed in float64.

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log decay (``<= 0``); the state is multiplied by ``exp(g)`` each step.
        beta: ``[B, T, H]`` delta-rule learning rate.
        scale: output scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` or None (zeros).
        output_final_state: also return the final state(s).
        cu_seqlens: optional int tensor ``[N + 1]`` of sequence offsets packing ``N`` sequences
            into the time axis (requires ``B == 1``); the state resets at every boundary.
        use_qk_l2norm_in_kernel: L2-normalise q and k per head first (see :func:`l2norm`).

    Returns:
        ``(o [B, T, H, V] in q.dtype, final_state [N, H, K, V] float32 or None)``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K**-0.5
    out_dtype = q.dtype
    f64 = torch.float64
    q, k, v, g, beta = (x.to(f64) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q = l2norm(q)
        k = l2norm(k)
    q = q * scale

    # time-major views: [T, B, H, *]
    q_TBHK, k_TBHK, v_TBHV = (x.transpose(0, 1) for x in (q, k, v))
    g_TBH, beta_TBH = (x.transpose(0, 1) for x in (g, beta))

    if cu_seqlens is None:
        if initial_state is None:
            h0_BHKV = q.new_zeros(B, H, K, V)
        else:
            h0_BHKV = initial_state.to(f64)
        o_TBHV, state_BHKV = _recurrence(q_TBHK, k_TBHK, v_TBHV, g_TBH, beta_TBH, h0_BHKV)
        o = o_TBHV.transpose(0, 1)
        final = state_BHKV
    else:
        offsets = [int(x) for x in cu_seqlens.tolist()]
        outs, finals = [], []
        for n, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
            if initial_state is None:
                h0_1HKV = q.new_zeros(1, H, K, V)
            else:
                h0_1HKV = initial_state[n : n + 1].to(f64)
            sl = slice(start, end)
            o_TBHV, state_1HKV = _recurrence(
                q_TBHK[sl], k_TBHK[sl], v_TBHV[sl], g_TBH[sl], beta_TBH[sl], h0_1HKV
            )
            outs.append(o_TBHV)
            finals.append(state_1HKV)
        o = torch.cat(outs, dim=0).transpose(0, 1)
        final = torch.cat(finals, dim=0)

    return o.to(out_dtype), (final.float() if output_final_state else None)
