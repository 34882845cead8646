"""Forward kernels: chunk-local prep (G, UT inverse, W, U, Q), the forward state pass, the output.
(The backward reruns the prep and the state pass.)"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    _COMPILED,
    _chunk_ptrs,
    _cumsum,
    _decay_CC,
    _dot,
    _load_G,
    _load_tok,
    _load_tok_raw,
    _state_pass_program,
    _state_ptrs,
    _store_tok,
    _sum,
    _tok_vec_ptrs,
    _unit_lower_inverse,
)


@triton.jit
def _fwd_prep_kernel(
    k_ptr, v_ptr, g_ptr, beta_ptr,  # inputs, token-major
    G_ptr, Tinv_ptr, W_ptr, U_ptr, Q_ptr,  # chunk-major outputs (G, Tinv: in if HAVE_TINV)
    chunk_tok0_ptr, chunk_len_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, LOG2C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAVE_TINV: tl.constexpr, STORE_Q: tl.constexpr,
    TINV_F32: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """Chunk-local prep: G = cumsum(g), Tinv = (I + A)^-1, W = Tinv beta Gam k, U = Tinv beta v.
    With HAVE_TINV (the backward's recompute) G and Tinv are read back from the forward. With
    STORE_Q also Q = W^T (k gam / Gam) [K, K] for the reverse state pass (into Q_ptr). TINV_F32:
    Tinv is saved in float32 and the diagonals go on it (see below), else it is saved in the
    buffer dtype and the diagonals go on k and v."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    tok0 = tl.load(chunk_tok0_ptr + c)
    n = tl.load(chunk_len_ptr + c)
    t_C = tl.arange(0, C)

    g_ptrs, row_mask = _tok_vec_ptrs(g_ptr, tok0, n, h, H, C)
    b_ptrs, _ = _tok_vec_ptrs(beta_ptr, tok0, n, h, H, C)
    b_C = tl.load(b_ptrs, mask=row_mask, other=0.0).to(tl.float32)
    T_ptrs, T_mask = _chunk_ptrs(Tinv_ptr, c, h, 0, H, C, C, C)
    if HAVE_TINV:
        G_C = tl.load(G_ptr + (c.to(tl.int64) * H + h) * C + t_C)
        # saved in float32, or in the buffer dtype that _dot rounds it to anyway (not TINV_F32):
        # either way W and U come out bitwise equal to the forward's
        Tinv_CC = tl.load(T_ptrs, mask=T_mask, other=0.0).to(tl.float32)
    else:
        g_C = tl.load(g_ptrs, mask=row_mask, other=0.0).to(tl.float32)
        G_C = _cumsum(g_C, axis=0)  # padding rows (g = 0) repeat G of the last real token
        tl.store(G_ptr + (c.to(tl.int64) * H + h) * C + t_C, G_C)
        KK_CC = tl.full([C, C], 0.0, tl.float32)
        for k0 in range(0, K, BK):
            k_CK = _load_tok(k_ptr, tok0, n, h, k0, H, K, C, BK)
            KK_CC += _dot(k_CK, tl.trans(k_CK), LOWP)
        A_CC = b_C[:, None] * KK_CC * _decay_CC(G_C, C, True)
        Tinv_CC = _unit_lower_inverse(A_CC, C, LOG2C, LOWP)
        tl.store(T_ptrs, Tinv_CC.to(T_ptrs.dtype.element_ty), mask=T_mask)

    # U = Tinv diag(beta) v and W = Tinv diag(beta Gam) k. With TINV_F32 the diagonals go on Tinv
    # (float32 here and as saved), so v and k enter the products exactly as stored and each
    # product rounds one operand to 16 bits, not two; else they go on v and k (x 1 is exact).
    # U first: with TINV_F32, Tb is dead after Tw, one [C, C] float32 tile fewer live.
    ones_C = tl.full([C], 1.0, tl.float32)
    Gam_C = tl.exp(G_C)
    Tb_CC = Tinv_CC * b_C[None, :] if TINV_F32 else Tinv_CC
    vs_C = ones_C if TINV_F32 else b_C
    for v0 in range(0, V, BV):
        v_CV = _load_tok(v_ptr, tok0, n, h, v0, H, V, C, BV)
        U_CV = _dot(Tb_CC, v_CV * vs_C[:, None], LOWP)
        U_ptrs, U_mask = _chunk_ptrs(U_ptr, c, h, v0, H, V, C, BV)
        tl.store(U_ptrs, U_CV.to(U_ptrs.dtype.element_ty), mask=U_mask)
    Tw_CC = Tb_CC * Gam_C[None, :] if TINV_F32 else Tinv_CC
    ks_C = ones_C if TINV_F32 else b_C * Gam_C
    tail_C = tl.exp(_sum(tl.where(t_C == C - 1, G_C, 0.0), axis=0) - G_C)  # gam / Gam
    for k0 in range(0, K, BK):
        k_CK = _load_tok(k_ptr, tok0, n, h, k0, H, K, C, BK)
        w_CK = _dot(Tw_CC, k_CK * ks_C[:, None], LOWP)
        w_ptrs, w_mask = _chunk_ptrs(W_ptr, c, h, k0, H, K, C, BK)
        tl.store(w_ptrs, w_CK.to(w_ptrs.dtype.element_ty), mask=w_mask)
        if STORE_Q:
            # (_dot rounds W like its store above: Q is built from the W the passes use)
            for j0 in range(0, K, BK):
                kdec_CK = _load_tok(k_ptr, tok0, n, h, j0, H, K, C, BK) * tail_C[:, None]
                Q_KK = _dot(tl.trans(w_CK), kdec_CK, LOWP)
                Q_ptrs, Q_mask = _state_ptrs(Q_ptr, c, h, k0, j0, H, K, K, BK, BK)
                tl.store(Q_ptrs, Q_KK.to(Q_ptrs.dtype.element_ty), mask=Q_mask)


# The state passes are a serial chain over chunks with little arithmetic per step, so they are
# bound by memory latency. Each iteration first issues the loads of the next chunk (a manual
# one-chunk prefetch into registers, masked off past the end) and then does the current chunk's
# maths, whose own inputs were loaded one iteration earlier. (Triton's software pipeliner needs
# a `for` loop and gave NaN in this kernel's backward in bf16, see docs/kernels.md.)


@triton.jit
def _fwd_state_load(c, tok0, n, h, v0, ok, k_ptr, G_ptr, W_ptr, U_ptr,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                    KP: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    w_ptrs, w_mask = _chunk_ptrs(W_ptr, c, h, 0, H, K, C, KP)
    w_CK = tl.load(w_ptrs, mask=w_mask & ok, other=0.0)
    U_ptrs, U_mask = _chunk_ptrs(U_ptr, c, h, v0, H, V, C, BV)
    U_CV = tl.load(U_ptrs, mask=U_mask & ok, other=0.0)
    k_CK = _load_tok_raw(k_ptr, tok0, n, h, 0, ok, H, K, C, KP)
    G_C, G_last = _load_G(G_ptr, c, h, ok, H, C)
    return w_CK, U_CV, k_CK, G_C, G_last


@triton.jit
def _fwd_state_step(
    S_KV, c, h, v0, w_CK, U_CV, k_CK, G_C, G_last, U_ptr, states_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    KP: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """One chunk of the forward state pass: store S, u = U - W S, return the next S."""
    S_mask = (tl.arange(0, KP)[:, None] < K) & (v0 + tl.arange(0, BV)[None, :] < V)
    st_ptrs, _ = _state_ptrs(states_ptr, c, h, 0, v0, H, K, V, KP, BV)
    tl.store(st_ptrs, S_KV.to(st_ptrs.dtype.element_ty), mask=S_mask)
    u_CV = U_CV.to(tl.float32) - _dot(w_CK, S_KV, LOWP)
    u_ptrs, u_mask = _chunk_ptrs(U_ptr, c, h, v0, H, V, C, BV)
    tl.store(u_ptrs, u_CV.to(u_ptrs.dtype.element_ty), mask=u_mask)
    # the decay to the chunk end goes on u (float32 here), not on k: k enters the product exactly
    # as stored, so the 16-bit operands are rounded once (u * decay) instead of twice
    udec_CV = u_CV * tl.exp(G_last - G_C)[:, None]
    return S_KV * tl.exp(G_last) + _dot(tl.trans(k_CK), udec_CV, LOWP)


@triton.jit
def _fwd_state_kernel(
    k_ptr, G_ptr, W_ptr, U_ptr,  # U is overwritten by u = U - W S
    h0_ptr, states_ptr, ht_ptr,
    seq_chunk0_ptr, seq_nchunks_ptr, seq_tok0_ptr, seq_len_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    KP: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, PREFETCH: tl.constexpr,
    PIPE: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """Inter-chunk recurrence for one V-slice of one sequence and head (sequential over chunks).
    Writes the state entering every chunk, u = U - W S in place of U, and the final state. With
    PIPE > 0 (compiled only) the chunk loop is a `for` loop that Triton software-pipelines over
    PIPE stages (the loads of later chunks in flight into shared memory) instead of PREFETCH."""
    v0, s, h, c0, nc, bos, L, S_KV, S_mask = _state_pass_program(
        seq_chunk0_ptr, seq_nchunks_ptr, seq_tok0_ptr, seq_len_ptr, h0_ptr,
        H, K, V, KP, BV, HAS_H0,
    )  # fmt: skip
    if PIPE > 0 and _COMPILED:
        for i in tl.range(0, nc, num_stages=PIPE):
            w_CK, U_CV, k_CK, G_C, G_last = _fwd_state_load(
                c0 + i, bos + i * C, tl.minimum(L - i * C, C), h, v0, i < nc,
                k_ptr, G_ptr, W_ptr, U_ptr, H, K, V, C, KP, BV,
            )  # fmt: skip
            S_KV = _fwd_state_step(
                S_KV, c0 + i, h, v0, w_CK, U_CV, k_CK, G_C, G_last, U_ptr, states_ptr,
                H, K, V, C, KP, BV, LOWP,
            )  # fmt: skip
    else:
        if PREFETCH:
            w_CK, U_CV, k_CK, G_C, G_last = _fwd_state_load(
                c0, bos, tl.minimum(L, C), h, v0, nc > 0,
                k_ptr, G_ptr, W_ptr, U_ptr, H, K, V, C, KP, BV,
            )  # fmt: skip
        # a while loop: Triton's interpreter cannot range() over a loaded bound
        i = nc * 0
        while i < nc:
            if PREFETCH:
                j = i + 1
                w_nx, U_nx, k_nx, G_nx, Gl_nx = _fwd_state_load(
                    c0 + j, bos + j * C, tl.minimum(L - j * C, C), h, v0, j < nc,
                    k_ptr, G_ptr, W_ptr, U_ptr, H, K, V, C, KP, BV,
                )  # fmt: skip
            else:
                w_CK, U_CV, k_CK, G_C, G_last = _fwd_state_load(
                    c0 + i, bos + i * C, tl.minimum(L - i * C, C), h, v0, i < nc,
                    k_ptr, G_ptr, W_ptr, U_ptr, H, K, V, C, KP, BV,
                )  # fmt: skip
            S_KV = _fwd_state_step(
                S_KV, c0 + i, h, v0, w_CK, U_CV, k_CK, G_C, G_last, U_ptr, states_ptr,
                H, K, V, C, KP, BV, LOWP,
            )  # fmt: skip
            if PREFETCH:
                w_CK, U_CV, k_CK, G_C, G_last = w_nx, U_nx, k_nx, G_nx, Gl_nx
            i += 1
    ht_ptrs, _ = _state_ptrs(ht_ptr, s, h, 0, v0, H, K, V, KP, BV)
    tl.store(ht_ptrs, S_KV, mask=S_mask)


@triton.jit
def _fwd_output_kernel(
    q_ptr, k_ptr, G_ptr, u_ptr, states_ptr, o_ptr,
    chunk_tok0_ptr, chunk_len_ptr, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """o = diag(Gam) q S + ((q k^T) * D) u for one chunk, head and V-slice. q goes into the
    products as stored; scale and Gam are applied to their float32 results (scaling q first would
    round q * scale * Gam to 16 bits once more)."""
    v0 = tl.program_id(0) * BV
    c = tl.program_id(1)
    h = tl.program_id(2)
    tok0 = tl.load(chunk_tok0_ptr + c)
    n = tl.load(chunk_len_ptr + c)
    t_C = tl.arange(0, C)
    G_C = tl.load(G_ptr + (c.to(tl.int64) * H + h) * C + t_C)

    qk_CC = tl.full([C, C], 0.0, tl.float32)
    o_CV = tl.full([C, BV], 0.0, tl.float32)
    for k0 in range(0, K, BK):
        q_CK = _load_tok(q_ptr, tok0, n, h, k0, H, K, C, BK)
        k_CK = _load_tok(k_ptr, tok0, n, h, k0, H, K, C, BK)
        qk_CC += _dot(q_CK, tl.trans(k_CK), LOWP)
        S_ptrs, S_mask = _state_ptrs(states_ptr, c, h, k0, v0, H, K, V, BK, BV)
        S_KV = tl.load(S_ptrs, mask=S_mask, other=0.0)
        o_CV += _dot(q_CK, S_KV, LOWP)
    o_CV *= (scale * tl.exp(G_C))[:, None]
    u_ptrs, u_mask = _chunk_ptrs(u_ptr, c, h, v0, H, V, C, BV)
    u_CV = tl.load(u_ptrs, mask=u_mask, other=0.0)
    o_CV += _dot(qk_CC * (scale * _decay_CC(G_C, C, False)), u_CV, LOWP)
    _store_tok(o_ptr, o_CV, tok0, n, h, v0, H, V, C, BV)
