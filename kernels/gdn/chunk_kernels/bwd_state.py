"""Backward reverse state passes: the split pass (chunk-parallel right-hand sides + a serial
chain of one product per chunk) and the older two-product pass (used for K > 128)."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    _COMPILED,
    _chunk_ptrs,
    _decay_CC,
    _dot,
    _load_G,
    _load_tok,
    _load_tok_raw,
    _state_pass_program,
    _state_ptrs,
)


@triton.jit
def _bwd_state_load(c, tok0, n, h, v0, ok, q_ptr, k_ptr, G_ptr, W_ptr, do_ptr,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                    KP: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    q_CK = _load_tok_raw(q_ptr, tok0, n, h, 0, ok, H, K, C, KP)
    k_CK = _load_tok_raw(k_ptr, tok0, n, h, 0, ok, H, K, C, KP)
    do_CV = _load_tok_raw(do_ptr, tok0, n, h, v0, ok, H, V, C, BV)
    w_ptrs, w_mask = _chunk_ptrs(W_ptr, c, h, 0, H, K, C, KP)
    w_CK = tl.load(w_ptrs, mask=w_mask & ok, other=0.0)
    G_C, G_last = _load_G(G_ptr, c, h, ok, H, C)
    return q_CK, k_CK, do_CV, w_CK, G_C, G_last


@triton.jit
def _bwd_state_step(
    dS_KV, c, h, v0, q_CK, k_CK, do_CV, w_CK, G_C, G_last, dstates_ptr, du_ptr, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    KP: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """One chunk of the two-product reverse pass: store dS' and du; return dS of the entering
    state."""
    S_mask = (tl.arange(0, KP)[:, None] < K) & (v0 + tl.arange(0, BV)[None, :] < V)
    dst_ptrs, _ = _state_ptrs(dstates_ptr, c, h, 0, v0, H, K, V, KP, BV)
    tl.store(dst_ptrs, dS_KV.to(dst_ptrs.dtype.element_ty), mask=S_mask)

    q_CK = q_CK.to(tl.float32) * scale
    k_CK = k_CK.to(tl.float32)
    M_CC = _dot(q_CK, tl.trans(k_CK), LOWP) * _decay_CC(G_C, C, False)
    du_CV = (
        _dot(tl.trans(M_CC), do_CV, LOWP) + _dot(k_CK, dS_KV, LOWP) * tl.exp(G_last - G_C)[:, None]
    )
    du_ptrs, du_mask = _chunk_ptrs(du_ptr, c, h, v0, H, V, C, BV)
    tl.store(du_ptrs, du_CV.to(du_ptrs.dtype.element_ty), mask=du_mask)

    qdec_CK = q_CK * tl.exp(G_C)[:, None]
    return (
        dS_KV * tl.exp(G_last)
        + _dot(tl.trans(qdec_CK), do_CV, LOWP)
        - _dot(tl.trans(w_CK), du_CV, LOWP)
    )


@triton.jit
def _bwd_state_kernel(
    q_ptr, k_ptr, G_ptr, W_ptr, do_ptr, dht_ptr,
    dstates_ptr, du_ptr, dh0_ptr,
    seq_chunk0_ptr, seq_nchunks_ptr, seq_tok0_ptr, seq_len_ptr, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    KP: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """Reverse inter-chunk pass for one V-slice of one sequence and head. Writes dS' (gradient of
    the state leaving each chunk), du, and the gradient of the initial state."""
    v0, s, h, c0, nc, bos, L, dS_KV, S_mask = _state_pass_program(
        seq_chunk0_ptr, seq_nchunks_ptr, seq_tok0_ptr, seq_len_ptr, dht_ptr,
        H, K, V, KP, BV, HAS_DHT,
    )  # fmt: skip
    # (no prefetch here: the same one-chunk register prefetch as in the forward pass faults with
    # an illegal address on the H200 at some settings, see docs/kernels.md)
    i = nc - 1
    while i >= 0:
        q_CK, k_CK, do_CV, w_CK, G_C, G_last = _bwd_state_load(
            c0 + i, bos + i * C, tl.minimum(L - i * C, C), h, v0, i >= 0,
            q_ptr, k_ptr, G_ptr, W_ptr, do_ptr, H, K, V, C, KP, BV,
        )  # fmt: skip
        dS_KV = _bwd_state_step(
            dS_KV, c0 + i, h, v0, q_CK, k_CK, do_CV, w_CK, G_C, G_last, dstates_ptr, du_ptr,
            scale, H, K, V, C, KP, BV, LOWP,
        )  # fmt: skip
        i -= 1
    dh0_ptrs, _ = _state_ptrs(dh0_ptr, s, h, 0, v0, H, K, V, KP, BV)
    tl.store(dh0_ptrs, dS_KV, mask=S_mask)


# The reverse pass split in two (``split_bwd``): everything that does not depend on the chain is
# computed chunk-parallel first (`_bwd_rhs_kernel`: M^T do and B = (Gam q)^T do - W^T M^T do),
# leaving the serial kernel one product on its chain, dS = gam dS' - Q dS' + B, whose operands
# are loaded one chunk ahead, plus du = M^T do + kdec dS' beside it. The prefetch index is
# clamped to a chunk of the sequence instead of masked, so no address is ever out of bounds
# (the last prefetch re-reads chunk 0 of the sequence and is not used).


@triton.jit
def _bwd_rhs_kernel(
    q_ptr, k_ptr, do_ptr, G_ptr, W_ptr, Mdo_ptr, B_ptr,
    chunk_tok0_ptr, chunk_len_ptr, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    KP: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """For one chunk and head: M^T do (into Mdo_ptr, chunk-major [C, V]) and
    B = (Gam q)^T do - W^T (M^T do) (into B_ptr, state-shaped), M = (q k^T) * D."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    tok0 = tl.load(chunk_tok0_ptr + c)
    n = tl.load(chunk_len_ptr + c)
    G_C = tl.load(G_ptr + (c.to(tl.int64) * H + h) * C + tl.arange(0, C))
    q_CK = _load_tok(q_ptr, tok0, n, h, 0, H, K, C, KP)  # unscaled: scale goes on M (exact)
    k_CK = _load_tok(k_ptr, tok0, n, h, 0, H, K, C, KP)
    w_ptrs, w_mask = _chunk_ptrs(W_ptr, c, h, 0, H, K, C, KP)
    w_CK = tl.load(w_ptrs, mask=w_mask, other=0.0)
    M_CC = _dot(q_CK, tl.trans(k_CK), LOWP) * (scale * _decay_CC(G_C, C, False))
    qdec_CK = q_CK * (scale * tl.exp(G_C))[:, None]
    for v0 in range(0, V, BV):
        do_CV = _load_tok(do_ptr, tok0, n, h, v0, H, V, C, BV)
        Mdo_CV = _dot(tl.trans(M_CC), do_CV, LOWP)
        Mdo_ptrs, Mdo_mask = _chunk_ptrs(Mdo_ptr, c, h, v0, H, V, C, BV)
        tl.store(Mdo_ptrs, Mdo_CV.to(Mdo_ptrs.dtype.element_ty), mask=Mdo_mask)
        B_KV = _dot(tl.trans(qdec_CK), do_CV, LOWP) - _dot(tl.trans(w_CK), Mdo_CV, LOWP)
        B_ptrs, B_mask = _state_ptrs(B_ptr, c, h, 0, v0, H, K, V, KP, BV)
        tl.store(B_ptrs, B_KV.to(B_ptrs.dtype.element_ty), mask=B_mask)


@triton.jit
def _bwd_chain_load(c, h, v0, Q_ptr, B_ptr, G_ptr, H: tl.constexpr, K: tl.constexpr,
                    V: tl.constexpr, C: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr,
                    CHAIN_Q: tl.constexpr):  # fmt: skip
    """The chain operands of chunk c: Q [KP, KP] (CHAIN_Q) or W [C, KP], the [KP, BV] slice of
    B, G_last."""
    r_K = tl.arange(0, KP)
    if CHAIN_Q:
        Q_ptrs = Q_ptr + (c.to(tl.int64) * H + h) * (K * K) + (r_K[:, None] * K + r_K[None, :])
        Q_KK = tl.load(Q_ptrs, mask=(r_K[:, None] < K) & (r_K[None, :] < K), other=0.0)
    else:
        w_ptrs, w_mask = _chunk_ptrs(Q_ptr, c, h, 0, H, K, C, KP)
        Q_KK = tl.load(w_ptrs, mask=w_mask, other=0.0)
    B_ptrs, B_mask = _state_ptrs(B_ptr, c, h, 0, v0, H, K, V, KP, BV)
    B_KV = tl.load(B_ptrs, mask=B_mask, other=0.0)
    return Q_KK, B_KV, tl.load(G_ptr + (c.to(tl.int64) * H + h) * C + C - 1)


@triton.jit
def _bwd_chain_step(
    dS_KV, Q_KK, B_KV, G_last, c, i, h, v0, bos, L, S_mask, k_ptr, G_ptr, dstates_ptr, du_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    KP: tl.constexpr, BV: tl.constexpr, CHAIN_Q: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """Chunk c (the sequence's i-th) of the reverse chain: store dS' and du, return dS. Q_KK is
    Q (CHAIN_Q: one product on the chain, k dS' for du beside it) or W (two dependent products,
    dS = gam dS' + B - W^T (kdec dS'), no Q to build and read)."""
    # for du: issued first (off the chain with CHAIN_Q, used after the chain product)
    k_CK = _load_tok(k_ptr, bos + i * C, tl.minimum(L - i * C, C), h, 0, H, K, C, KP)
    du_ptrs, du_mask = _chunk_ptrs(du_ptr, c, h, v0, H, V, C, BV)
    Mdo_CV = tl.load(du_ptrs, mask=du_mask, other=0.0).to(tl.float32)
    G_C = tl.load(G_ptr + (c.to(tl.int64) * H + h) * C + tl.arange(0, C))

    dst_ptrs, _ = _state_ptrs(dstates_ptr, c, h, 0, v0, H, K, V, KP, BV)
    tl.store(dst_ptrs, dS_KV.to(dst_ptrs.dtype.element_ty), mask=S_mask)
    # decay on the float32 product, not on k (one 16-bit rounding of the operands less)
    kdS_CV = _dot(k_CK, dS_KV, LOWP) * tl.exp(G_last - G_C)[:, None]
    if CHAIN_Q:
        dS_in = dS_KV * tl.exp(G_last) - _dot(Q_KK, dS_KV, LOWP) + B_KV.to(tl.float32)
    else:
        dS_in = dS_KV * tl.exp(G_last) - _dot(tl.trans(Q_KK), kdS_CV, LOWP) + B_KV.to(tl.float32)
    du_CV = Mdo_CV + kdS_CV
    tl.store(du_ptrs, du_CV.to(du_ptrs.dtype.element_ty), mask=du_mask)
    return dS_in


@triton.jit
def _bwd_chain_kernel(
    k_ptr, G_ptr, Q_ptr, dht_ptr, dstates_ptr, du_ptr, dh0_ptr,
    seq_chunk0_ptr, seq_nchunks_ptr, seq_tok0_ptr, seq_len_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    KP: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr, PIPE: tl.constexpr,
    CHAIN_Q: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """Reverse pass for one V-slice of one sequence and head: dstates[c] holds B_c on entry and
    receives dS'_c; du[c] holds M^T do on entry and receives du = M^T do + diag(gam / Gam) k dS'_c.
    Q_ptr is Q [NC, H, K, K] with CHAIN_Q, else W [NC, H, C, K] (see _bwd_chain_step). With
    PIPE > 0 (compiled only) a software-pipelined `for` loop replaces the register prefetch."""
    v0, s, h, c0, nc, bos, L, dS_KV, S_mask = _state_pass_program(
        seq_chunk0_ptr, seq_nchunks_ptr, seq_tok0_ptr, seq_len_ptr, dht_ptr,
        H, K, V, KP, BV, HAS_DHT,
    )  # fmt: skip
    if PIPE > 0 and _COMPILED:
        for j in tl.range(0, nc, num_stages=PIPE):
            i = nc - 1 - j
            Q_KK, B_KV, G_last = _bwd_chain_load(
                c0 + i, h, v0, Q_ptr, dstates_ptr, G_ptr, H, K, V, C, KP, BV, CHAIN_Q
            )
            dS_KV = _bwd_chain_step(
                dS_KV, Q_KK, B_KV, G_last, c0 + i, i, h, v0, bos, L, S_mask,
                k_ptr, G_ptr, dstates_ptr, du_ptr, H, K, V, C, KP, BV, CHAIN_Q, LOWP,
            )  # fmt: skip
    else:
        if nc > 0:
            Q_KK, B_KV, G_last = _bwd_chain_load(
                c0 + nc - 1, h, v0, Q_ptr, dstates_ptr, G_ptr, H, K, V, C, KP, BV, CHAIN_Q
            )
            i = nc - 1
            while i >= 0:
                Q_nx, B_nx, Gl_nx = _bwd_chain_load(
                    c0 + tl.maximum(i - 1, 0), h, v0, Q_ptr, dstates_ptr, G_ptr,
                    H, K, V, C, KP, BV, CHAIN_Q,
                )  # fmt: skip
                dS_KV = _bwd_chain_step(
                    dS_KV, Q_KK, B_KV, G_last, c0 + i, i, h, v0, bos, L, S_mask,
                    k_ptr, G_ptr, dstates_ptr, du_ptr, H, K, V, C, KP, BV, CHAIN_Q, LOWP,
                )  # fmt: skip
                Q_KK, B_KV, G_last = Q_nx, B_nx, Gl_nx
                i -= 1
    dh0_ptrs, _ = _state_ptrs(dh0_ptr, s, h, 0, v0, H, K, V, KP, BV)
    tl.store(dh0_ptrs, dS_KV, mask=S_mask)
