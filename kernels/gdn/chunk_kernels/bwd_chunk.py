"""Backward chunk-local gradients (dq, dk, dv, dbeta, dg), fused or split by K blocks."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    _chunk_ptrs,
    _cumsum,
    _decay_CC,
    _dot,
    _load_tok,
    _state_ptrs,
    _store_tok,
    _sum,
    _tok_vec_ptrs,
)

# The backward's chunk-local gradients in three phases (jit helpers, inlined): `_bwd_local`
# (everything that needs whole chunks: q k^T, k k^T, the V-contractions with u, dv), `_bwd_kblock`
# (dq, dk of one K block from the states) and `_bwd_finish` (dbeta, dg). `_bwd_chunk_kernel` runs
# all three in one program per chunk; with `split_bchunk` they are three kernels, the middle one
# over K blocks too (more, smaller programs), exchanging dP, dB and per-K-block row sums
# through memory (summed in a fixed order: still deterministic).


@triton.jit
def _bwd_local(
    c, h, tok0, n, q_ptr, k_ptr, v_ptr, do_ptr, Tinv_ptr, u_ptr, du_ptr, dv_ptr,
    b_C, G_C, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """Phases 1-3 of one chunk: stores dU' = Tinv^T du over du and dv; returns dP (gradient of
    q k^T), dB (gradient of k k^T) and the K-free parts of dbeta and dG."""
    t_C = tl.arange(0, C)
    # phase 1: q k^T and k k^T
    qk_CC = tl.full([C, C], 0.0, tl.float32)
    kk_CC = tl.full([C, C], 0.0, tl.float32)
    for k0 in range(0, K, BK):
        q_CK = _load_tok(q_ptr, tok0, n, h, k0, H, K, C, BK)
        k_CK = _load_tok(k_ptr, tok0, n, h, k0, H, K, C, BK)
        qk_CC += _dot(q_CK, tl.trans(k_CK), LOWP)
        kk_CC += _dot(k_CK, tl.trans(k_CK), LOWP)
    qk_CC *= scale  # (q enters the products as stored: one 16-bit rounding less)

    # phase 2: V-contractions with u: dM = do u^T, dU' = Tinv^T du, dA = -dU' u^T; dv
    T_ptrs, T_mask = _chunk_ptrs(Tinv_ptr, c, h, 0, H, C, C, C)
    # in du's (the buffer's) dtype, what _dot rounds it to anyway: a float32 Tinv (tinv_f32) would
    # hold twice the registers through the loop
    Tinv_CC = tl.load(T_ptrs, mask=T_mask, other=0.0).to(du_ptr.dtype.element_ty)
    dM_CC = tl.full([C, C], 0.0, tl.float32)
    dA_CC = tl.full([C, C], 0.0, tl.float32)
    db_C = tl.full([C], 0.0, tl.float32)
    D_CC = _decay_CC(G_C, C, False)
    for v0 in range(0, V, BV):
        do_CV = _load_tok(do_ptr, tok0, n, h, v0, H, V, C, BV)
        v_CV = _load_tok(v_ptr, tok0, n, h, v0, H, V, C, BV)
        u_ptrs, u_mask = _chunk_ptrs(u_ptr, c, h, v0, H, V, C, BV)
        u_CV = tl.load(u_ptrs, mask=u_mask, other=0.0)
        du_ptrs, _ = _chunk_ptrs(du_ptr, c, h, v0, H, V, C, BV)
        du_CV = tl.load(du_ptrs, mask=u_mask, other=0.0)
        dUp_CV = _dot(tl.trans(Tinv_CC), du_CV, LOWP)
        tl.store(du_ptrs, dUp_CV.to(du_ptrs.dtype.element_ty), mask=u_mask)
        _store_tok(dv_ptr, dUp_CV * b_C[:, None], tok0, n, h, v0, H, V, C, BV)
        db_C += _sum(v_CV * dUp_CV, axis=1)
        dM_CC += _dot(do_CV, tl.trans(u_CV), LOWP)
        dA_CC -= _dot(dUp_CV, tl.trans(u_CV), LOWP)

    # phase 3: through the decay matrix and A = beta (k k^T) * D
    dP_CC = dM_CC * D_CC  # gradient of q k^T
    dA_CC = tl.where(t_C[:, None] > t_C[None, :], dA_CC, 0.0)
    dB_CC = b_C[:, None] * dA_CC * D_CC  # gradient of k k^T
    db_C += _sum(dA_CC * kk_CC * D_CC, axis=1)
    E_CC = dP_CC * qk_CC + dB_CC * kk_CC  # gradient of log D, times D
    dG_C = _sum(E_CC, axis=1) - _sum(E_CC, axis=0)
    return dP_CC, dB_CC, db_C, dG_C


@triton.jit
def _bwd_kblock(
    k0, c, h, tok0, n, q_ptr, k_ptr, do_ptr, u_ptr, dUp_ptr, states_ptr, dstates_ptr,
    dq_ptr, dk_ptr, dP_CC, dB_CC, b_C, Gam_C, tail_C, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """Phase 4 for the K block at k0: the V-contractions with the states, then dq and dk (stored).
    Returns the block's share of the row sums (q S)_t . do_t, (k S)_t . dU'_t, (k dS')_t . u_t and
    the block's rows of sum(S * dS') over V."""
    acc_q = tl.full([C, BK], 0.0, tl.float32)  # do S^T
    acc_u = tl.full([C, BK], 0.0, tl.float32)  # u dS'^T
    acc_y = tl.full([C, BK], 0.0, tl.float32)  # dU' S^T
    dgam = tl.full([BK], 0.0, tl.float32)
    for v0 in range(0, V, BV):
        do_CV = _load_tok(do_ptr, tok0, n, h, v0, H, V, C, BV)
        u_ptrs, u_mask = _chunk_ptrs(u_ptr, c, h, v0, H, V, C, BV)
        u_CV = tl.load(u_ptrs, mask=u_mask, other=0.0)
        dUp_ptrs, _ = _chunk_ptrs(dUp_ptr, c, h, v0, H, V, C, BV)
        dUp_CV = tl.load(dUp_ptrs, mask=u_mask, other=0.0)
        S_ptrs, S_mask = _state_ptrs(states_ptr, c, h, k0, v0, H, K, V, BK, BV)
        S_KV = tl.load(S_ptrs, mask=S_mask, other=0.0).to(tl.float32)
        dS_ptrs, _ = _state_ptrs(dstates_ptr, c, h, k0, v0, H, K, V, BK, BV)
        dS_KV = tl.load(dS_ptrs, mask=S_mask, other=0.0).to(tl.float32)
        acc_q += _dot(do_CV, tl.trans(S_KV), LOWP)
        acc_u += _dot(u_CV, tl.trans(dS_KV), LOWP)
        acc_y += _dot(dUp_CV, tl.trans(S_KV), LOWP)
        dgam += _sum(S_KV * dS_KV, axis=1)
    q_CK = _load_tok(q_ptr, tok0, n, h, k0, H, K, C, BK)  # unscaled: scale goes on the results
    k_CK = _load_tok(k_ptr, tok0, n, h, k0, H, K, C, BK)
    dq_CK = Gam_C[:, None] * acc_q + _dot(dP_CC, k_CK, LOWP)
    dk_CK = (
        tail_C[:, None] * acc_u
        - (b_C * Gam_C)[:, None] * acc_y
        + _dot(tl.trans(dP_CC), q_CK, LOWP) * scale
        + _dot(dB_CC + tl.trans(dB_CC), k_CK, LOWP)
    )
    _store_tok(dq_ptr, dq_CK * scale, tok0, n, h, k0, H, K, C, BK)
    _store_tok(dk_ptr, dk_CK, tok0, n, h, k0, H, K, C, BK)
    return (
        _sum(q_CK * acc_q, axis=1) * scale,
        _sum(k_CK * acc_y, axis=1),
        _sum(k_CK * acc_u, axis=1),
        dgam,
    )


@triton.jit
def _bwd_finish(
    tok0, n, h, dg_ptr, dbeta_ptr, db_C, dG_C, r_o, r_y, r_u, dgam, b_C, G_C, G_last,
    H: tl.constexpr, C: tl.constexpr,
):  # fmt: skip
    """Phase 5: dbeta and dG -> dg (reverse cumsum inside the chunk), stored."""
    t_C = tl.arange(0, C)
    Gam_C = tl.exp(G_C)
    tail_C = tl.exp(G_last - G_C)
    db_C -= Gam_C * r_y
    dG_C += Gam_C * r_o - b_C * Gam_C * r_y - tail_C * r_u
    dG_last = tl.exp(G_last) * dgam + _sum(tail_C * r_u, axis=0)
    dG_C += tl.where(t_C == C - 1, dG_last, 0.0)
    dg_C = _cumsum(dG_C, axis=0, reverse=True)
    dg_ptrs, row_mask = _tok_vec_ptrs(dg_ptr, tok0, n, h, H, C)
    tl.store(dg_ptrs, dg_C.to(dg_ptr.dtype.element_ty), mask=row_mask)
    db_ptrs, _ = _tok_vec_ptrs(dbeta_ptr, tok0, n, h, H, C)
    tl.store(db_ptrs, db_C.to(dbeta_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _bwd_chunk_head(c, h, chunk_tok0_ptr, chunk_len_ptr, beta_ptr, G_ptr,
                    H: tl.constexpr, C: tl.constexpr):  # fmt: skip
    """tok0, n, beta, G and G_last of chunk c, head h."""
    tok0 = tl.load(chunk_tok0_ptr + c)
    n = tl.load(chunk_len_ptr + c)
    b_ptrs, row_mask = _tok_vec_ptrs(beta_ptr, tok0, n, h, H, C)
    b_C = tl.load(b_ptrs, mask=row_mask, other=0.0).to(tl.float32)
    G_C = tl.load(G_ptr + (c.to(tl.int64) * H + h) * C + tl.arange(0, C))
    G_last = tl.load(G_ptr + (c.to(tl.int64) * H + h) * C + C - 1)
    return tok0, n, b_C, G_C, G_last


@triton.jit
def _bwd_chunk_kernel(
    q_ptr, k_ptr, v_ptr, beta_ptr, do_ptr,  # inputs, token-major
    G_ptr, Tinv_ptr, u_ptr, states_ptr, dstates_ptr, du_ptr,  # recomputed / bwd-state buffers
    dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dg_ptr,  # outputs, token-major
    chunk_tok0_ptr, chunk_len_ptr, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """All input gradients of one chunk and head (chunk-local, given S, dS' and du). du_ptr holds
    du from the reverse pass and is overwritten with dU' = Tinv^T du."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    tok0, n, b_C, G_C, G_last = _bwd_chunk_head(
        c, h, chunk_tok0_ptr, chunk_len_ptr, beta_ptr, G_ptr, H, C
    )
    dP_CC, dB_CC, db_C, dG_C = _bwd_local(
        c, h, tok0, n, q_ptr, k_ptr, v_ptr, do_ptr, Tinv_ptr, u_ptr, du_ptr, dv_ptr,
        b_C, G_C, scale, H, K, V, C, BK, BV, LOWP,
    )  # fmt: skip
    Gam_C = tl.exp(G_C)
    tail_C = tl.exp(G_last - G_C)  # decay from token t to the chunk end
    r_o = tl.full([C], 0.0, tl.float32)  # (q S)_t . do_t
    r_y = tl.full([C], 0.0, tl.float32)  # (k S)_t . dU'_t
    r_u = tl.full([C], 0.0, tl.float32)  # (k dS')_t . u_t
    dgam = tl.full([BK], 0.0, tl.float32)  # sum(S * dS'), reduced at the end
    for k0 in range(0, K, BK):
        ro, ry, ru, dga = _bwd_kblock(
            k0, c, h, tok0, n, q_ptr, k_ptr, do_ptr, u_ptr, du_ptr, states_ptr, dstates_ptr,
            dq_ptr, dk_ptr, dP_CC, dB_CC, b_C, Gam_C, tail_C, scale, H, K, V, C, BK, BV, LOWP,
        )  # fmt: skip
        r_o += ro
        r_y += ry
        r_u += ru
        dgam += dga
    _bwd_finish(
        tok0, n, h, dg_ptr, dbeta_ptr, db_C, dG_C, r_o, r_y, r_u, _sum(dgam, axis=0), b_C, G_C,
        G_last, H, C,
    )  # fmt: skip


@triton.jit
def _bwd_local_kernel(
    q_ptr, k_ptr, v_ptr, beta_ptr, do_ptr, G_ptr, Tinv_ptr, u_ptr, du_ptr, dv_ptr,
    dP_ptr, dB_ptr, part_ptr,  # out: [NC, H, C, C] x 2, [NC, H, 2, C] float32 (db, dG)
    chunk_tok0_ptr, chunk_len_ptr, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """split_bchunk, first kernel [NC, H]: phases 1-3 of one chunk."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    tok0, n, b_C, G_C, G_last = _bwd_chunk_head(
        c, h, chunk_tok0_ptr, chunk_len_ptr, beta_ptr, G_ptr, H, C
    )
    dP_CC, dB_CC, db_C, dG_C = _bwd_local(
        c, h, tok0, n, q_ptr, k_ptr, v_ptr, do_ptr, Tinv_ptr, u_ptr, du_ptr, dv_ptr,
        b_C, G_C, scale, H, K, V, C, BK, BV, LOWP,
    )  # fmt: skip
    P_ptrs, P_mask = _chunk_ptrs(dP_ptr, c, h, 0, H, C, C, C)
    tl.store(P_ptrs, dP_CC.to(dP_ptr.dtype.element_ty), mask=P_mask)
    B_ptrs, _ = _chunk_ptrs(dB_ptr, c, h, 0, H, C, C, C)
    tl.store(B_ptrs, dB_CC.to(dB_ptr.dtype.element_ty), mask=P_mask)
    t_C = tl.arange(0, C)
    base = part_ptr + (c.to(tl.int64) * H + h) * (2 * C)
    tl.store(base + t_C, db_C)
    tl.store(base + C + t_C, dG_C)


@triton.jit
def _bwd_kblock_kernel(
    q_ptr, k_ptr, beta_ptr, do_ptr, G_ptr, u_ptr, dUp_ptr, states_ptr, dstates_ptr,
    dP_ptr, dB_ptr, dq_ptr, dk_ptr, rows_ptr,  # rows: [NKB, NC, H, 4, C] float32
    chunk_tok0_ptr, chunk_len_ptr, NC, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """split_bchunk, second kernel [K/BK, NC, H]: phase 4 of one chunk's K block."""
    kb = tl.program_id(0)
    c = tl.program_id(1)
    h = tl.program_id(2)
    tok0, n, b_C, G_C, G_last = _bwd_chunk_head(
        c, h, chunk_tok0_ptr, chunk_len_ptr, beta_ptr, G_ptr, H, C
    )
    P_ptrs, P_mask = _chunk_ptrs(dP_ptr, c, h, 0, H, C, C, C)
    dP_CC = tl.load(P_ptrs, mask=P_mask, other=0.0)
    B_ptrs, _ = _chunk_ptrs(dB_ptr, c, h, 0, H, C, C, C)
    dB_CC = tl.load(B_ptrs, mask=P_mask, other=0.0)
    ro, ry, ru, dga = _bwd_kblock(
        kb * BK, c, h, tok0, n, q_ptr, k_ptr, do_ptr, u_ptr, dUp_ptr, states_ptr, dstates_ptr,
        dq_ptr, dk_ptr, dP_CC, dB_CC, b_C, tl.exp(G_C), tl.exp(G_last - G_C), scale,
        H, K, V, C, BK, BV, LOWP,
    )  # fmt: skip
    t_C = tl.arange(0, C)
    base = rows_ptr + ((kb.to(tl.int64) * NC + c) * H + h) * (4 * C)
    tl.store(base + t_C, ro)
    tl.store(base + C + t_C, ry)
    tl.store(base + 2 * C + t_C, ru)
    tl.store(base + 3 * C + t_C, tl.where(t_C == 0, _sum(dga, axis=0), 0.0))


@triton.jit
def _bwd_finish_kernel(
    beta_ptr, G_ptr, part_ptr, rows_ptr, dbeta_ptr, dg_ptr,
    chunk_tok0_ptr, chunk_len_ptr, NC, NKB,
    H: tl.constexpr, C: tl.constexpr,
):  # fmt: skip
    """split_bchunk, third kernel [NC, H]: the K-block row sums added in order, then phase 5."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    tok0, n, b_C, G_C, G_last = _bwd_chunk_head(
        c, h, chunk_tok0_ptr, chunk_len_ptr, beta_ptr, G_ptr, H, C
    )
    t_C = tl.arange(0, C)
    base = part_ptr + (c.to(tl.int64) * H + h) * (2 * C)
    db_C = tl.load(base + t_C)
    dG_C = tl.load(base + C + t_C)
    r_o = tl.full([C], 0.0, tl.float32)
    r_y = tl.full([C], 0.0, tl.float32)
    r_u = tl.full([C], 0.0, tl.float32)
    dgam = tl.full([C], 0.0, tl.float32)
    kb = NKB * 0
    while kb < NKB:  # (a while loop: the interpreter cannot range() over a runtime bound)
        rb = rows_ptr + ((kb.to(tl.int64) * NC + c) * H + h) * (4 * C)
        r_o += tl.load(rb + t_C)
        r_y += tl.load(rb + C + t_C)
        r_u += tl.load(rb + 2 * C + t_C)
        dgam += tl.load(rb + 3 * C + t_C)
        kb += 1
    _bwd_finish(
        tok0, n, h, dg_ptr, dbeta_ptr, db_C, dG_C, r_o, r_y, r_u, _sum(dgam, axis=0), b_C, G_C,
        G_last, H, C,
    )  # fmt: skip
