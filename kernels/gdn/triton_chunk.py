"""Chunked Gated DeltaNet in Triton (forward and backward), deterministic by construction.

Same maths as :mod:`.chunk_torch` (read its docstring for the derivation). Per head, per chunk of
``C = 64`` tokens with entering state ``S`` [K, V], in-chunk cumulative log decay ``G``,
``Gam = exp(G)``, ``gam = exp(G_last)`` and ``D_tj = exp(G_t - G_j)`` (``j <= t``)::

    A   = strict_lower(diag(beta) (k k^T) * D)       Tinv = (I + A)^-1          (UT transform)
    W   = Tinv diag(beta Gam) k                       U    = Tinv diag(beta) v
    u   = U - W S                                     (the delta-rule updates "v_new")
    o   = diag(Gam) q S + ((q k^T) * D) u             (q pre-scaled)
    S'  = gam S + (k * gam / Gam)^T u

Backward (``dS'`` the gradient of the state leaving the chunk, ``dU' = Tinv^T du``)::

    du  = ((q k^T) * D)^T do + (k * gam / Gam) dS'
    dS  = gam dS' + (Gam q)^T do - W^T du                      (reverse pass over chunks)
        = gam dS' - Q dS' + (Gam q)^T do - W^T ((q k^T) * D)^T do,   Q = W^T (k * gam / Gam)
    dA  = -strict_lower(dU' u^T)  (because u = Tinv Y with Y = beta v - beta Gam k S)
    dv  = beta dU',  dq, dk, dbeta, dG from the chunk-local terms; dg = reverse cumsum of dG.

The second form of dS (``split_bwd``, the default for K <= 128) splits the reverse pass: the
chunk-local ``B = (Gam q)^T do - W^T (M^T do)`` (M = (q k^T) * D) is computed chunk-parallel
first, leaving one product, ``Q dS'``, on the serial chain instead of two (``kdec dS'`` then
``W^T du``); ``Q`` [K, K] per chunk comes from the backward's prep.

Kernels (grid in brackets; NC chunks over all sequences, N sequences, H heads):

* ``_l2norm_fwd_kernel`` / ``_l2norm_bwd_kernel`` [rows / 16]  the optional per-head L2 norm of
  q and k (the forward writes normalised q, k in the input dtype and keeps them with the float32
  rsqrt per row; the backward needs nothing else)
* ``_fwd_prep_kernel``   [NC, H]     G = cumsum(g), Tinv (recursive doubling), W and U; in the
  backward: reads G and Tinv, recomputes W, U and writes Q
* ``_fwd_state_kernel``  [V/BV, N*H] sequential over a sequence's chunks: S per chunk, u, final S
* ``_fwd_output_kernel`` [V/BV, NC, H] o
* ``_bwd_rhs_kernel``    [NC, H]     M^T do and B of one chunk (split_bwd)
* ``_bwd_chain_kernel``  [V/BV, N*H] reverse over chunks: dS' per chunk, du, d(initial state)
  (split_bwd; ``_bwd_state_kernel`` does the same from the inputs with two products per step)
* ``_bwd_chunk_kernel``  [NC, H]     dq, dk, dv, dbeta, dg of one chunk

Determinism: no atomics. Every output element is written by exactly one program, and every
reduction (over K, V, chunk rows, the in-chunk reverse cumsum for dg) runs in a fixed order
inside that program, so two runs with the same inputs are bitwise equal.

Sequences (rows of the batch, or ``cu_seqlens`` packs) are cut into chunks that never straddle a
sequence boundary; a sequence's last chunk may be short (masked loads, zeros beyond it). The
chunk-local intermediates are stored chunk-major and padded to ``C`` rows, where padding rows are
neutral (``g = beta = 0``, ``q = k = v = 0``).

The forward keeps the inputs plus ``G`` and ``Tinv`` (``[NC, H, C]`` float32, ``[NC, H, C, C]``
in the buffer dtype: C / (2V) of v's size) for the backward, which recomputes ``W``, ``u`` and the
per-chunk states from them (one cheap prep pass and one forward state pass) rather than holding
``[NC, H, K, V]`` states between forward and backward.

Block sizes, warps and the kernel variants are in ``_config`` (tuned on the H200; override with
``GDN_TRITON_CFG`` for tuning runs, see ``benchmarks/gdn_kernels.py --sweep``).
"""

# legend: T tokens (batch rows flattened: B * T_seq), H heads, K key dim, V value dim, C chunk,
#         NC chunks, N sequences, BK / BV blocks of K / V, KP / VP K / V padded to a power of 2

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from types import ModuleType

import torch
import triton
import triton.language as tl

CHUNK = 64

# triton.jit picks compiled kernels or the CPU interpreter when it decorates, i.e. at import.
# Kernels of this module were decorated in this mode; see _module_in_mode for the other one.
_INTERPRETED = bool(triton.knobs.runtime.interpret)

# dot-product modes (constexpr LOWP): operands kept float32 (exact "ieee" products), or cast to
# the 16-bit input dtype with float32 accumulation (tensor cores)
_DOT_F32, _DOT_BF16, _DOT_F16 = 0, 1, 2


def _dot_mode(dtype: torch.dtype) -> int:
    return {torch.bfloat16: _DOT_BF16, torch.float16: _DOT_F16}.get(dtype, _DOT_F32)


# ----------------------------------------------------------------------------------------------
# small device helpers
# ----------------------------------------------------------------------------------------------


# Sums and scans call tl.reduce / tl.associative_scan with triton's own sum combiner rather than
# tl.sum / tl.cumsum, and zeros come from tl.full rather than tl.zeros: those three are
# @triton.jit functions of triton.language, decorated once when triton is imported, which a
# module copy built for the interpreter later in the process (see _module_in_mode) cannot call.
# The interpreter recognises the sum combiner and reduces with numpy.


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _cumsum(x, axis: tl.constexpr, reverse: tl.constexpr = False):
    return tl.associative_scan(x, axis, tl.standard._sum_combine, reverse=reverse)


# Triton's interpreter computes bfloat16 dots wrongly (numpy has no bfloat16): there, round the
# operands to bfloat16 and multiply in float32, which is what the tensor cores compute.
_BF16_DOT_IN_F32: tl.constexpr = tl.constexpr(_INTERPRETED)
# Loops whose trip count is loaded from memory can be `for` loops with software pipelining
# (tl.range num_stages) only when compiled: the interpreter cannot range() over a loaded bound.
_COMPILED: tl.constexpr = tl.constexpr(not _INTERPRETED)


@triton.jit
def _dot(a, b, LOWP: tl.constexpr):
    """a @ b with float32 accumulation; operands in the 16-bit input dtype when LOWP."""
    if LOWP == 1:
        if _BF16_DOT_IN_F32:
            a16 = a.to(tl.bfloat16).to(tl.float32)
            return tl.dot(a16, b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif LOWP == 2:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _dot_f32(a, b, LOWP: tl.constexpr):
    """float32 a @ b for the UT inverse: exact products ("ieee") on the float32 path, TF32
    tensor cores (10-bit mantissa, still finer than the bf16 operands downstream) otherwise."""
    if LOWP == 0:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _tok_ptrs(ptr, tok0, n, h, d0, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
              BD: tl.constexpr):  # fmt: skip
    """Pointers and mask of a [C, BD] tile of a token-major [T, H, D] tensor."""
    t_C = tl.arange(0, C)
    d_D = d0 + tl.arange(0, BD)
    # a 64-bit scalar base and 32-bit tile offsets: 64-bit offset tiles cost twice the registers
    base = ptr + (tok0.to(tl.int64) * H + h) * D
    ptrs = base + (t_C[:, None] * (H * D) + d_D[None, :])
    mask = (t_C[:, None] < n) & (d_D[None, :] < D)
    return ptrs, mask


@triton.jit
def _load_tok(ptr, tok0, n, h, d0, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
              BD: tl.constexpr):  # fmt: skip
    ptrs, mask = _tok_ptrs(ptr, tok0, n, h, d0, H, D, C, BD)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tok(ptr, x, tok0, n, h, d0, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
               BD: tl.constexpr):  # fmt: skip
    ptrs, mask = _tok_ptrs(ptr, tok0, n, h, d0, H, D, C, BD)
    tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tok_vec_ptrs(ptr, tok0, n, h, H: tl.constexpr, C: tl.constexpr):
    """Pointers and mask of a [C] vector of a token-major [T, H] tensor (g, beta, dg, dbeta)."""
    t_C = tl.arange(0, C)
    return ptr + (tok0 + t_C).to(tl.int64) * H + h, t_C < n


@triton.jit
def _chunk_ptrs(ptr, c, h, d0, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                BD: tl.constexpr):  # fmt: skip
    """Pointers and mask of a [C, BD] tile of a chunk-major [NC, H, C, D] buffer."""
    t_C = tl.arange(0, C)
    d_D = d0 + tl.arange(0, BD)
    ptrs = ptr + (c.to(tl.int64) * H + h) * (C * D) + t_C[:, None] * D + d_D[None, :]
    mask = (t_C[:, None] < C) & (d_D[None, :] < D)
    return ptrs, mask


@triton.jit
def _state_ptrs(ptr, idx, h, k0, v0, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    """Pointers and mask of a [BK, BV] tile of a state tensor [*, H, K, V]."""
    k_K = k0 + tl.arange(0, BK)
    v_V = v0 + tl.arange(0, BV)
    ptrs = ptr + (idx.to(tl.int64) * H + h) * (K * V) + k_K[:, None] * V + v_V[None, :]
    mask = (k_K[:, None] < K) & (v_V[None, :] < V)
    return ptrs, mask


@triton.jit
def _decay_CC(G_C, C: tl.constexpr, STRICT: tl.constexpr):
    """D[t, j] = exp(G_t - G_j) on the causal part (j <= t, or j < t when STRICT), else 0."""
    t_C = tl.arange(0, C)
    if STRICT:
        causal = t_C[:, None] > t_C[None, :]
    else:
        causal = t_C[:, None] >= t_C[None, :]
    # masked before exp: G_t - G_j > 0 above the diagonal and could overflow
    return tl.exp(tl.where(causal, G_C[:, None] - G_C[None, :], float("-inf")))


@triton.jit
def _unit_lower_inverse(A_CC, C: tl.constexpr, LOG2C: tl.constexpr, LOWP: tl.constexpr):
    """(I + A)^-1 for a strictly lower-triangular [C, C] A (C = 2^LOG2C), in float32.

    Recursive doubling of the block size: if X is the inverse of the block-diagonal part of
    I + A with blocks of size s, then for every pair of neighbouring blocks merged into one of
    size 2s, [[I + A11, 0], [A21, I + A22]]^-1 = [[X1, 0], [-X2 A21 X1, X2]], i.e.
    X' = X - X Aoff X with Aoff = A restricted to the lower-left s x s quadrant of each 2s block.
    Exact block forward substitution (no power series, so no cancellation between large terms),
    all on 2-D [C, C] tiles with tensor-core dots: 2 (LOG2C - 1) products for C = 64.
    """
    r_C = tl.arange(0, C)[:, None]
    c_C = tl.arange(0, C)[None, :]
    # block size 1 -> 2 needs no product: X = I - A on the first sub-diagonal of each 2-block
    X = tl.where(r_C == c_C, 1.0, 0.0) - tl.where((r_C // 2 == c_C // 2) & (r_C > c_C), A_CC, 0.0)
    for lvl in tl.static_range(1, LOG2C):
        s = 2**lvl  # constexpr: the loop is unrolled
        quad = (r_C // s == c_C // s + 1) & ((c_C // s) % 2 == 0)
        X = X - _dot_f32(X, _dot_f32(tl.where(quad, A_CC, 0.0), X, LOWP), LOWP)
    return X


@triton.jit
def _l2norm_fwd_kernel(
    x_ptr, y_ptr, rstd_ptr, R, D: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr
):
    """y = x * rstd with rstd = rsqrt(sum(x^2) + 1e-6) over the last dim of R rows (float32
    maths; y in y's dtype: the chunk kernels read it as a matmul operand, so 16-bit inputs stay
    16-bit; rstd float32, kept for the backward)."""
    r0 = tl.program_id(0).to(tl.int64) * BR
    r_R = tl.arange(0, BR)
    d_D = tl.arange(0, DP)
    offs = r0 * D + (r_R[:, None] * D + d_D[None, :])
    mask = (r0 + r_R[:, None] < R) & (d_D[None, :] < D)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(_sum(x * x, 1) + 1e-6)
    tl.store(y_ptr + offs, (x * rstd[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + r0 + r_R, rstd, mask=r0 + r_R < R)


@triton.jit
def _l2norm_bwd_kernel(
    y_ptr, rstd_ptr, dy_ptr, dx_ptr, R, D: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr
):
    """dx = rstd (dy - y (dy . y)) from the forward's y and rstd (float32 maths)."""
    r0 = tl.program_id(0).to(tl.int64) * BR
    r_R = tl.arange(0, BR)
    d_D = tl.arange(0, DP)
    offs = r0 * D + (r_R[:, None] * D + d_D[None, :])
    mask = (r0 + r_R[:, None] < R) & (d_D[None, :] < D)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + r0 + r_R, mask=r0 + r_R < R, other=0.0)
    dx = rstd[:, None] * (dy - y * _sum(dy * y, 1)[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_prep_kernel(
    k_ptr, v_ptr, g_ptr, beta_ptr,  # inputs, token-major
    G_ptr, Tinv_ptr, W_ptr, U_ptr, Q_ptr,  # chunk-major outputs (G, Tinv: in if HAVE_TINV)
    chunk_tok0_ptr, chunk_len_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, LOG2C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAVE_TINV: tl.constexpr, STORE_Q: tl.constexpr,
    LOWP: tl.constexpr,
):  # fmt: skip
    """Chunk-local prep: G = cumsum(g), Tinv = (I + A)^-1, W = Tinv beta Gam k, U = Tinv beta v.
    With HAVE_TINV (the backward's recompute) G and Tinv are read back from the forward. With
    STORE_Q also Q = W^T (k gam / Gam) [K, K] for the reverse state pass (into Q_ptr)."""
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
        # stored in the buffer dtype, which is what _dot rounds Tinv to anyway: W and U come
        # out bitwise equal to the forward's
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

    bGam_C = b_C * tl.exp(G_C)
    tail_C = tl.exp(_sum(tl.where(t_C == C - 1, G_C, 0.0), axis=0) - G_C)  # gam / Gam
    for k0 in range(0, K, BK):
        k_CK = _load_tok(k_ptr, tok0, n, h, k0, H, K, C, BK)
        w_CK = _dot(Tinv_CC, k_CK * bGam_C[:, None], LOWP)
        w_ptrs, w_mask = _chunk_ptrs(W_ptr, c, h, k0, H, K, C, BK)
        tl.store(w_ptrs, w_CK.to(w_ptrs.dtype.element_ty), mask=w_mask)
        if STORE_Q:
            # (_dot rounds W like its store above: Q is built from the W the passes use)
            for j0 in range(0, K, BK):
                kdec_CK = _load_tok(k_ptr, tok0, n, h, j0, H, K, C, BK) * tail_C[:, None]
                Q_KK = _dot(tl.trans(w_CK), kdec_CK, LOWP)
                Q_ptrs, Q_mask = _state_ptrs(Q_ptr, c, h, k0, j0, H, K, K, BK, BK)
                tl.store(Q_ptrs, Q_KK.to(Q_ptrs.dtype.element_ty), mask=Q_mask)
    for v0 in range(0, V, BV):
        v_CV = _load_tok(v_ptr, tok0, n, h, v0, H, V, C, BV)
        U_CV = _dot(Tinv_CC, v_CV * b_C[:, None], LOWP)
        U_ptrs, U_mask = _chunk_ptrs(U_ptr, c, h, v0, H, V, C, BV)
        tl.store(U_ptrs, U_CV.to(U_ptrs.dtype.element_ty), mask=U_mask)


@triton.jit
def _load_tok_raw(ptr, tok0, n, h, d0, ok, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                  BD: tl.constexpr):  # fmt: skip
    """A [C, BD] token tile in its stored dtype (prefetched tiles: half the registers for
    16-bit inputs), all zeros when not ok."""
    ptrs, mask = _tok_ptrs(ptr, tok0, n, h, d0, H, D, C, BD)
    return tl.load(ptrs, mask=mask & ok, other=0.0)


@triton.jit
def _load_G(G_ptr, c, h, ok, H: tl.constexpr, C: tl.constexpr):
    """G of chunk c (zeros when not ok) and its last entry."""
    t_C = tl.arange(0, C)
    base = G_ptr + (c.to(tl.int64) * H + h) * C
    G_C = tl.load(base + t_C, mask=ok & (t_C < C), other=0.0)
    G_last = tl.load(base + C - 1, mask=ok, other=0.0)
    return G_C, G_last


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
    kdec_CK = k_CK.to(tl.float32) * tl.exp(G_last - G_C)[:, None]
    return S_KV * tl.exp(G_last) + _dot(tl.trans(kdec_CK), u_CV, LOWP)


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
    v0 = tl.program_id(0) * BV
    s = tl.program_id(1) // H
    h = tl.program_id(1) % H
    c0 = tl.load(seq_chunk0_ptr + s)
    nc = tl.load(seq_nchunks_ptr + s)
    bos = tl.load(seq_tok0_ptr + s)
    L = tl.load(seq_len_ptr + s)

    S_ptrs0, S_mask = _state_ptrs(h0_ptr, s, h, 0, v0, H, K, V, KP, BV)
    if HAS_H0:
        S_KV = tl.load(S_ptrs0, mask=S_mask, other=0.0).to(tl.float32)
    else:
        S_KV = tl.full([KP, BV], 0.0, tl.float32)
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


# ----------------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------------


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
    kdec_CK = k_CK * tl.exp(G_last - G_C)[:, None]
    du_CV = _dot(tl.trans(M_CC), do_CV, LOWP) + _dot(kdec_CK, dS_KV, LOWP)
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
    v0 = tl.program_id(0) * BV
    s = tl.program_id(1) // H
    h = tl.program_id(1) % H
    c0 = tl.load(seq_chunk0_ptr + s)
    nc = tl.load(seq_nchunks_ptr + s)
    bos = tl.load(seq_tok0_ptr + s)
    L = tl.load(seq_len_ptr + s)

    dS_ptrs0, S_mask = _state_ptrs(dht_ptr, s, h, 0, v0, H, K, V, KP, BV)
    if HAS_DHT:
        dS_KV = tl.load(dS_ptrs0, mask=S_mask, other=0.0).to(tl.float32)
    else:
        dS_KV = tl.full([KP, BV], 0.0, tl.float32)
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
    q_CK = _load_tok(q_ptr, tok0, n, h, 0, H, K, C, KP) * scale
    k_CK = _load_tok(k_ptr, tok0, n, h, 0, H, K, C, KP)
    w_ptrs, w_mask = _chunk_ptrs(W_ptr, c, h, 0, H, K, C, KP)
    w_CK = tl.load(w_ptrs, mask=w_mask, other=0.0)
    M_CC = _dot(q_CK, tl.trans(k_CK), LOWP) * _decay_CC(G_C, C, False)
    qdec_CK = q_CK * tl.exp(G_C)[:, None]
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
                    V: tl.constexpr, C: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    """The chain operands of chunk c: Q [KP, KP], the [KP, BV] slice of B, G_last."""
    r_K = tl.arange(0, KP)
    Q_ptrs = Q_ptr + (c.to(tl.int64) * H + h) * (K * K) + (r_K[:, None] * K + r_K[None, :])
    Q_KK = tl.load(Q_ptrs, mask=(r_K[:, None] < K) & (r_K[None, :] < K), other=0.0)
    B_ptrs, B_mask = _state_ptrs(B_ptr, c, h, 0, v0, H, K, V, KP, BV)
    B_KV = tl.load(B_ptrs, mask=B_mask, other=0.0)
    return Q_KK, B_KV, tl.load(G_ptr + (c.to(tl.int64) * H + h) * C + C - 1)


@triton.jit
def _bwd_chain_step(
    dS_KV, Q_KK, B_KV, G_last, c, i, h, v0, bos, L, S_mask, k_ptr, G_ptr, dstates_ptr, du_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    KP: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """Chunk c (the sequence's i-th) of the reverse chain: store dS' and du, return dS."""
    # off the chain, for du: issued first, used after the chain product
    k_CK = _load_tok(k_ptr, bos + i * C, tl.minimum(L - i * C, C), h, 0, H, K, C, KP)
    du_ptrs, du_mask = _chunk_ptrs(du_ptr, c, h, v0, H, V, C, BV)
    Mdo_CV = tl.load(du_ptrs, mask=du_mask, other=0.0).to(tl.float32)
    G_C = tl.load(G_ptr + (c.to(tl.int64) * H + h) * C + tl.arange(0, C))

    dst_ptrs, _ = _state_ptrs(dstates_ptr, c, h, 0, v0, H, K, V, KP, BV)
    tl.store(dst_ptrs, dS_KV.to(dst_ptrs.dtype.element_ty), mask=S_mask)
    dS_in = dS_KV * tl.exp(G_last) - _dot(Q_KK, dS_KV, LOWP) + B_KV.to(tl.float32)
    kdec_CK = k_CK * tl.exp(G_last - G_C)[:, None]
    du_CV = Mdo_CV + _dot(kdec_CK, dS_KV, LOWP)
    tl.store(du_ptrs, du_CV.to(du_ptrs.dtype.element_ty), mask=du_mask)
    return dS_in


@triton.jit
def _bwd_chain_kernel(
    k_ptr, G_ptr, Q_ptr, dht_ptr, dstates_ptr, du_ptr, dh0_ptr,
    seq_chunk0_ptr, seq_nchunks_ptr, seq_tok0_ptr, seq_len_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    KP: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr, PIPE: tl.constexpr,
    LOWP: tl.constexpr,
):  # fmt: skip
    """Reverse pass for one V-slice of one sequence and head: dstates[c] holds B_c on entry and
    receives dS'_c; du[c] holds M^T do on entry and receives du = M^T do + kdec dS'_c. With
    PIPE > 0 (compiled only) a software-pipelined `for` loop replaces the register prefetch."""
    v0 = tl.program_id(0) * BV
    s = tl.program_id(1) // H
    h = tl.program_id(1) % H
    c0 = tl.load(seq_chunk0_ptr + s)
    nc = tl.load(seq_nchunks_ptr + s)
    bos = tl.load(seq_tok0_ptr + s)
    L = tl.load(seq_len_ptr + s)

    dS_ptrs0, S_mask = _state_ptrs(dht_ptr, s, h, 0, v0, H, K, V, KP, BV)
    if HAS_DHT:
        dS_KV = tl.load(dS_ptrs0, mask=S_mask, other=0.0).to(tl.float32)
    else:
        dS_KV = tl.full([KP, BV], 0.0, tl.float32)
    if PIPE > 0 and _COMPILED:
        for j in tl.range(0, nc, num_stages=PIPE):
            i = nc - 1 - j
            Q_KK, B_KV, G_last = _bwd_chain_load(
                c0 + i, h, v0, Q_ptr, dstates_ptr, G_ptr, H, K, V, C, KP, BV
            )
            dS_KV = _bwd_chain_step(
                dS_KV, Q_KK, B_KV, G_last, c0 + i, i, h, v0, bos, L, S_mask,
                k_ptr, G_ptr, dstates_ptr, du_ptr, H, K, V, C, KP, BV, LOWP,
            )  # fmt: skip
    else:
        if nc > 0:
            Q_KK, B_KV, G_last = _bwd_chain_load(
                c0 + nc - 1, h, v0, Q_ptr, dstates_ptr, G_ptr, H, K, V, C, KP, BV
            )
            i = nc - 1
            while i >= 0:
                Q_nx, B_nx, Gl_nx = _bwd_chain_load(
                    c0 + tl.maximum(i - 1, 0), h, v0, Q_ptr, dstates_ptr, G_ptr,
                    H, K, V, C, KP, BV,
                )  # fmt: skip
                dS_KV = _bwd_chain_step(
                    dS_KV, Q_KK, B_KV, G_last, c0 + i, i, h, v0, bos, L, S_mask,
                    k_ptr, G_ptr, dstates_ptr, du_ptr, H, K, V, C, KP, BV, LOWP,
                )  # fmt: skip
                Q_KK, B_KV, G_last = Q_nx, B_nx, Gl_nx
                i -= 1
    dh0_ptrs, _ = _state_ptrs(dh0_ptr, s, h, 0, v0, H, K, V, KP, BV)
    tl.store(dh0_ptrs, dS_KV, mask=S_mask)


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
        q_CK = _load_tok(q_ptr, tok0, n, h, k0, H, K, C, BK) * scale
        k_CK = _load_tok(k_ptr, tok0, n, h, k0, H, K, C, BK)
        qk_CC += _dot(q_CK, tl.trans(k_CK), LOWP)
        kk_CC += _dot(k_CK, tl.trans(k_CK), LOWP)

    # phase 2: V-contractions with u: dM = do u^T, dU' = Tinv^T du, dA = -dU' u^T; dv
    T_ptrs, T_mask = _chunk_ptrs(Tinv_ptr, c, h, 0, H, C, C, C)
    Tinv_CC = tl.load(T_ptrs, mask=T_mask, other=0.0)
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
    q_CK = _load_tok(q_ptr, tok0, n, h, k0, H, K, C, BK) * scale
    k_CK = _load_tok(k_ptr, tok0, n, h, k0, H, K, C, BK)
    dq_CK = Gam_C[:, None] * acc_q + _dot(dP_CC, k_CK, LOWP)
    dk_CK = (
        tail_C[:, None] * acc_u
        - (b_C * Gam_C)[:, None] * acc_y
        + _dot(tl.trans(dP_CC), q_CK, LOWP)
        + _dot(dB_CC + tl.trans(dB_CC), k_CK, LOWP)
    )
    _store_tok(dq_ptr, dq_CK * scale, tok0, n, h, k0, H, K, C, BK)
    _store_tok(dk_ptr, dk_CK, tok0, n, h, k0, H, K, C, BK)
    return (
        _sum(q_CK * acc_q, axis=1),
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


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Chunk tables: chunk c covers tokens chunk_tok0[c] .. + chunk_len[c] - 1; sequence s owns
    chunks seq_chunk0[s] .. + seq_nchunks[s] - 1 (int32 device tensors)."""

    chunk_tok0: torch.Tensor
    chunk_len: torch.Tensor
    seq_chunk0: torch.Tensor
    seq_nchunks: torch.Tensor
    seq_tok0: torch.Tensor
    seq_len: torch.Tensor
    n_chunks: int
    n_seqs: int


def _make_layout(offsets: list[int], device: torch.device) -> _Layout:
    tok0, lens, seq_chunk0, seq_nchunks = [], [], [], []
    for start, end in zip(offsets[:-1], offsets[1:]):
        seq_chunk0.append(len(tok0))
        for t in range(start, end, CHUNK):
            tok0.append(t)
            lens.append(min(CHUNK, end - t))
        seq_nchunks.append(len(tok0) - seq_chunk0[-1])
    seq_lens = [end - start for start, end in zip(offsets[:-1], offsets[1:])]
    table = torch.tensor([tok0, lens], dtype=torch.int32).reshape(2, -1).to(device)
    seqs = torch.tensor([seq_chunk0, seq_nchunks, offsets[:-1], seq_lens], dtype=torch.int32)
    seqs = seqs.to(device)
    return _Layout(*table, *seqs, n_chunks=len(tok0), n_seqs=len(seq_chunk0))


_LAYOUTS: dict[tuple, _Layout] = {}
_LAYOUTS_MAX = 64


def _layout(offsets: list[int], device: torch.device) -> _Layout:
    """_make_layout, cached: training sees the same few packings over and over, and building the
    tables is a Python loop over chunks plus two host-to-device copies per call."""
    key = (tuple(offsets), str(device))
    lay = _LAYOUTS.get(key)
    if lay is None:
        if len(_LAYOUTS) >= _LAYOUTS_MAX:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        lay = _LAYOUTS[key] = _make_layout(offsets, device)
    return lay


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


@dataclass
class _Config:
    """Block sizes and warps per kernel. The defaults were picked by the sweep in
    ``benchmarks/gdn_kernels.py --sweep`` on the H200 (see docs/kernels.md); any field can be
    overridden with ``GDN_TRITON_CFG="name=value,..."`` (for tuning runs)."""

    KP: int  # K padded (state kernels keep the whole K of a state slice in registers)
    BK: int  # K block of the chunk-parallel kernels
    BV: int  # V block of the prep and backward chunk kernels
    bv_out: int  # V slice of the output kernel
    bv_fstate: int  # V slice of the forward state pass (0: by occupancy, see _state_bv)
    bv_bstate: int  # V slice of the reverse state pass (0: by occupancy)
    bk_out: int = 0  # K block of the output kernel (0: BK)
    w_prep: int = 4
    w_fstate: int = 4
    w_out: int = 4
    w_bstate: int = 8
    w_bchunk: int = 8
    slots: int = 0  # programs per wave for the automatic state-pass V slices (0: SM count)
    pf_fstate: int = 1  # one-chunk register prefetch in the forward state pass
    pipe_fstate: int = 0  # > 0: software-pipelined chunk loop of that many stages instead
    pipe_bstate: int = 0  # the same for the reverse chain (_bwd_chain_kernel)
    split_bwd: int = 1  # reverse pass = _bwd_rhs_kernel + _bwd_chain_kernel, else _bwd_state_kernel
    split_bchunk: int = 0  # bwd chunk kernel as three kernels, the middle one per K block
    w_bkb: int = 4  # _bwd_kblock_kernel (split_bchunk)
    bk_bkb: int = 32  # K block of _bwd_kblock_kernel (narrow: 154-174 registers at 4 warps, sm_90)
    w_rhs: int = 8  # _bwd_rhs_kernel
    bv_rhs: int = 64  # V block of _bwd_rhs_kernel
    stages: int = 3  # num_stages of the chunk-parallel kernels (prep, output, bwd chunk)


def _config(K: int, V: int, LOWP: int) -> _Config:
    KP, VP = _pow2(K), _pow2(V)
    if KP <= 128:
        cfg = _Config(
            KP=KP, BK=min(KP, 64), BV=min(VP, 64), bv_out=min(VP, 128),
            bv_fstate=0, bv_bstate=0, w_fstate=8, w_out=8,
        )  # fmt: skip
        # the output kernel is cheaper on exact 32-wide K blocks than on 64-wide padded ones
        # (K = 96: 0.70 vs 1.07 ms at 4 x 8192 x 30 heads)
        cfg.bk_out = min(32, KP) if K % 64 else cfg.BK
    else:  # K > 128: [K, K] tiles of Q and [K, 64] state slices would not fit in registers
        cfg = _Config(
            KP=KP, BK=64, BV=min(VP, 64), bv_out=min(VP, 64), bv_fstate=16, bv_bstate=16,
            w_out=8, pf_fstate=0, split_bwd=0,
        )  # fmt: skip
    if LOWP == _DOT_F32:
        # exact float32 dots run on FMA units with large register tiles: 8 warps, no prefetch
        # (the float32 path is for checking, not speed)
        cfg.w_prep = cfg.w_fstate = cfg.w_out = cfg.w_bstate = cfg.w_bchunk = 8
        cfg.pf_fstate = cfg.bk_out = 0
    for item in filter(None, os.environ.get("GDN_TRITON_CFG", "").split(",")):
        name, value = (x.strip() for x in item.split("="))
        if not hasattr(cfg, name):
            raise ValueError(f"GDN_TRITON_CFG: unknown setting {name!r}")
        if LOWP == _DOT_F32 and name.startswith(("w_", "pf_")):
            continue  # the float32 path keeps its warps and prefetch
        setattr(cfg, name, int(value))
    return cfg


_SM_COUNT: dict[int, int] = {}


def _state_bv(bv: int, V: int, n_rows: int, device: torch.device, slots: int) -> int:
    """V slice of a state pass: ``bv`` if set, else 32 when that needs no more waves of programs
    than 64 does (``slots`` programs per wave, default the SM count: at 8 warps and ~160+
    registers one program fills an SM), else 64. The passes are serial over chunks, so a
    narrower slice is faster per program (H200, 1 x 32768 x 32 heads x 128/128: 64 programs of
    64 -> 128 of 32 took the two passes from 6.1 to 4.7 ms) but not once it adds a wave (30
    heads x 192: 90 -> 180 programs, 4.5 -> 9.0 ms)."""
    if bv:
        return bv
    if device.type != "cuda":
        return min(64, _pow2(V))
    slots = slots or _sm_count(device)
    waves = {cand: triton.cdiv(triton.cdiv(V, cand) * n_rows, slots) for cand in (32, 64)}
    return min(32 if waves[32] <= waves[64] else 64, _pow2(V))


def _buffer_dtype(x: torch.Tensor, LOWP: int) -> torch.dtype:
    """Intermediates (Tinv, W, u, per-chunk states and their gradients) are only ever matmul
    operands, which LOWP casts to 16 bits anyway: store them in 16 bits then (half the memory
    traffic), in float32 otherwise. G stays float32 and running states stay in registers."""
    return {_DOT_BF16: torch.bfloat16, _DOT_F16: torch.float16}.get(LOWP, torch.float32)


def _prep_and_states(
    k, v, g, beta, h0, lay: _Layout, cfg: _Config, LOWP: int, G=None, Tinv=None, store_q=False
):
    """Prep + forward state pass. G and Tinv are computed unless given (the backward passes the
    forward's). Returns (G, Tinv, W, u, states, final_state, Q or None)."""
    T, H, K = k.shape
    V = v.shape[-1]
    NC, N, C = lay.n_chunks, lay.n_seqs, CHUNK
    dev = k.device
    f32 = torch.float32
    idt = _buffer_dtype(k, LOWP)
    have_tinv = Tinv is not None
    if not have_tinv:
        G = torch.empty(NC, H, C, device=dev, dtype=f32)
        Tinv = torch.empty(NC, H, C, C, device=dev, dtype=idt)
    W = torch.empty(NC, H, C, K, device=dev, dtype=idt)
    u = torch.empty(NC, H, C, V, device=dev, dtype=idt)
    states = torch.empty(NC, H, K, V, device=dev, dtype=idt)
    ht = torch.empty(N, H, K, V, device=dev, dtype=f32)
    Q = torch.empty(NC, H, K, K, device=dev, dtype=idt) if store_q else None
    if NC > 0:
        _fwd_prep_kernel[(NC, H)](
            k, v, g, beta, G, Tinv, W, u, W if Q is None else Q, lay.chunk_tok0, lay.chunk_len,
            H=H, K=K, V=V, C=C, LOG2C=CHUNK.bit_length() - 1, BK=cfg.BK, BV=cfg.BV,
            HAVE_TINV=have_tinv, STORE_Q=store_q, LOWP=LOWP, num_warps=cfg.w_prep,
            num_stages=cfg.stages,
        )  # fmt: skip
    if N > 0:
        _fwd_states(k, G, W, u, states, h0, ht, lay, cfg, LOWP)
    return G, Tinv, W, u, states, ht, Q


def _fwd_states(k, G, W, u, states, h0, ht, lay: _Layout, cfg: _Config, LOWP: int):
    """The forward state pass: states, u = U - W S over U, the final state ht."""
    T, H, K = k.shape
    V = u.shape[-1]
    bv = _state_bv(cfg.bv_fstate, V, lay.n_seqs * H, k.device, cfg.slots)
    _fwd_state_kernel[(triton.cdiv(V, bv), lay.n_seqs * H)](
        k, G, W, u, h0 if h0 is not None else ht, states, ht,
        lay.seq_chunk0, lay.seq_nchunks, lay.seq_tok0, lay.seq_len,
        H=H, K=K, V=V, C=CHUNK, KP=cfg.KP, BV=bv, HAS_H0=h0 is not None,
        PREFETCH=bool(cfg.pf_fstate), PIPE=cfg.pipe_fstate, LOWP=LOWP, num_warps=cfg.w_fstate,
    )  # fmt: skip


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _sm_count(device: torch.device) -> int:
    idx = _device_index(device)
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _forward(q, k, v, g, beta, h0, scale, lay: _Layout, LOWP: int):
    """Returns (o, final_state, G, Tinv); G and Tinv are kept for the backward."""
    T, H, K = q.shape
    V = v.shape[-1]
    cfg = _config(K, V, LOWP)
    G, Tinv, _, u, states, ht, _ = _prep_and_states(k, v, g, beta, h0, lay, cfg, LOWP)
    o = torch.empty(T, H, V, device=q.device, dtype=q.dtype)
    if lay.n_chunks > 0:
        _fwd_output_kernel[(triton.cdiv(V, cfg.bv_out), lay.n_chunks, H)](
            q, k, G, u, states, o, lay.chunk_tok0, lay.chunk_len, scale,
            H=H, K=K, V=V, C=CHUNK, BK=cfg.bk_out or cfg.BK, BV=cfg.bv_out, LOWP=LOWP,
            num_warps=cfg.w_out,
            num_stages=cfg.stages,
        )  # fmt: skip
    return o, ht, G, Tinv


def _backward(q, k, v, g, beta, h0, G, Tinv, scale, lay: _Layout, do, dht, LOWP: int, dqk_dtype):
    T, H, K = q.shape
    V = v.shape[-1]
    NC, N, C = lay.n_chunks, lay.n_seqs, CHUNK
    cfg = _config(K, V, LOWP)
    split = bool(cfg.split_bwd)
    G, Tinv, W, u, states, _, Q = _prep_and_states(
        k, v, g, beta, h0, lay, cfg, LOWP, G, Tinv, store_q=split
    )
    dev = q.device
    idt = _buffer_dtype(q, LOWP)
    dstates = torch.empty(NC, H, K, V, device=dev, dtype=idt)
    du = torch.empty(NC, H, C, V, device=dev, dtype=idt)
    dh0 = torch.empty(N, H, K, V, device=dev, dtype=torch.float32)
    dq = torch.empty(q.shape, device=dev, dtype=dqk_dtype)
    dk = torch.empty(k.shape, device=dev, dtype=dqk_dtype)
    dv = torch.empty_like(v)
    dg, dbeta = torch.empty_like(g), torch.empty_like(beta)
    if N > 0:
        bv = _state_bv(cfg.bv_bstate, V, N * H, dev, cfg.slots)
        grid = (triton.cdiv(V, bv), N * H)
        dht_or_any = dht if dht is not None else dh0
    if split and N > 0:
        if NC > 0:  # M^T do into du, B into dstates (chunk-parallel)
            _bwd_rhs_kernel[(NC, H)](
                q, k, do, G, W, du, dstates, lay.chunk_tok0, lay.chunk_len, scale,
                H=H, K=K, V=V, C=C, KP=cfg.KP, BV=cfg.bv_rhs, LOWP=LOWP, num_warps=cfg.w_rhs,
            )  # fmt: skip
        _bwd_chain_kernel[grid](
            k, G, Q, dht_or_any, dstates, du, dh0,
            lay.seq_chunk0, lay.seq_nchunks, lay.seq_tok0, lay.seq_len,
            H=H, K=K, V=V, C=C, KP=cfg.KP, BV=bv, HAS_DHT=dht is not None,
            PIPE=cfg.pipe_bstate, LOWP=LOWP, num_warps=cfg.w_bstate,
        )  # fmt: skip
    elif N > 0:
        _bwd_state_kernel[grid](
            q, k, G, W, do, dht_or_any, dstates, du, dh0,
            lay.seq_chunk0, lay.seq_nchunks, lay.seq_tok0, lay.seq_len, scale,
            H=H, K=K, V=V, C=C, KP=cfg.KP, BV=bv, HAS_DHT=dht is not None, LOWP=LOWP,
            num_warps=cfg.w_bstate,
        )  # fmt: skip
    if NC > 0 and cfg.split_bchunk:
        _bwd_chunk_split(q, k, v, beta, do, G, Tinv, u, states, dstates, du, dq, dk, dv, dbeta,
                         dg, lay, scale, cfg, LOWP)  # fmt: skip
    elif NC > 0:
        _bwd_chunk_kernel[(NC, H)](
            q, k, v, beta, do, G, Tinv, u, states, dstates, du,
            dq, dk, dv, dbeta, dg, lay.chunk_tok0, lay.chunk_len, scale,
            H=H, K=K, V=V, C=C, BK=cfg.BK, BV=cfg.BV, LOWP=LOWP, num_warps=cfg.w_bchunk,
            num_stages=cfg.stages,
        )  # fmt: skip
    return dq, dk, dv, dg, dbeta, dh0


def _bwd_chunk_split(q, k, v, beta, do, G, Tinv, u, states, dstates, du, dq, dk, dv, dbeta, dg,
                     lay: _Layout, scale, cfg: _Config, LOWP: int):  # fmt: skip
    """The bwd chunk kernel's work as three kernels (``split_bchunk``), see _bwd_local."""
    T, H, K = q.shape
    V = v.shape[-1]
    NC, C = lay.n_chunks, CHUNK
    BKB = cfg.bk_bkb or cfg.BK
    NKB = triton.cdiv(K, BKB)
    dev = q.device
    f32 = torch.float32
    dP = torch.empty(NC, H, C, C, device=dev, dtype=Tinv.dtype)
    dB = torch.empty_like(dP)
    part = torch.empty(NC, H, 2, C, device=dev, dtype=f32)
    rows = torch.empty(NKB, NC, H, 4, C, device=dev, dtype=f32)
    meta = dict(H=H, K=K, V=V, C=C, BK=cfg.BK, BV=cfg.BV, LOWP=LOWP)
    _bwd_local_kernel[(NC, H)](
        q, k, v, beta, do, G, Tinv, u, du, dv, dP, dB, part, lay.chunk_tok0, lay.chunk_len,
        scale, **meta, num_warps=cfg.w_bchunk, num_stages=cfg.stages,
    )  # fmt: skip
    _bwd_kblock_kernel[(NKB, NC, H)](
        q, k, beta, do, G, u, du, states, dstates, dP, dB, dq, dk, rows,
        lay.chunk_tok0, lay.chunk_len, NC, scale, **{**meta, "BK": BKB}, num_warps=cfg.w_bkb,
        num_stages=cfg.stages,
    )  # fmt: skip
    _bwd_finish_kernel[(NC, H)](
        beta, G, part, rows, dbeta, dg, lay.chunk_tok0, lay.chunk_len, NC, NKB, H=H, C=C,
        num_warps=2,
    )  # fmt: skip


_L2_ROWS = 16  # rows per program of the l2norm kernels


def _l2norm_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head ``x * rsqrt(sum(x^2) + 1e-6)`` (float32 maths) in x's dtype, and the float32
    rsqrt per row."""
    D = x.shape[-1]
    R = x.numel() // D
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    if R > 0:
        _l2norm_fwd_kernel[(triton.cdiv(R, _L2_ROWS),)](
            x, y, rstd, R, D=D, DP=_pow2(D), BR=_L2_ROWS, num_warps=4
        )
    return y, rstd


def _l2norm_bwd(y: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, dtype) -> torch.Tensor:
    D = y.shape[-1]
    R = y.numel() // D
    dx = torch.empty(y.shape, device=y.device, dtype=dtype)
    if R > 0:
        _l2norm_bwd_kernel[(triton.cdiv(R, _L2_ROWS),)](
            y, rstd, dy, dx, R, D=D, DP=_pow2(D), BR=_L2_ROWS, num_warps=4
        )
    return dx


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """Autograd wrapper over the token-major kernels ([T, H, *] inputs, batch rows flattened).

    With L2 the per-head L2 norm of q and k is part of the op: the forward normalises them into
    fresh tensors of the input dtype (what the chunk kernels read) and keeps those with their
    float32 rsqrt instead of the raw q, k (same memory; the backward needs nothing else), the
    backward has the chunk kernels write dq, dk in float32 and applies the norm's backward in
    one more kernel. Also saved: G and Tinv (``[NC, H, C]`` float32 and ``[NC, H, C, C]`` in the
    buffer dtype, ~C / (2 V) of v's size), so the backward's recompute skips the UT inverse."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, lay, LOWP, L2):
        if L2:
            (q, rq), (k, rk) = _l2norm_fwd(q), _l2norm_fwd(k)
        o, ht, G, Tinv = _forward(q, k, v, g, beta, h0, scale, lay, LOWP)
        if L2:
            ctx.save_for_backward(q, k, v, g, beta, h0, G, Tinv, rq, rk)
        else:
            ctx.save_for_backward(q, k, v, g, beta, h0, G, Tinv)
        ctx.scale, ctx.lay, ctx.LOWP, ctx.L2 = scale, lay, LOWP, L2
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, G, Tinv, *rstd = ctx.saved_tensors
        L2 = ctx.L2
        do = torch.zeros(v.shape, device=v.device, dtype=q.dtype) if do is None else do.contiguous()
        dht = None if dht is None else dht.contiguous()
        # float32 dq, dk ahead of the norm's backward, which subtracts their projection on q, k
        dqk_dtype = torch.float32 if L2 else q.dtype
        dq, dk, dv, dg, dbeta, dh0 = _backward(
            q, k, v, g, beta, h0, G, Tinv, ctx.scale, ctx.lay, do, dht, ctx.LOWP, dqk_dtype
        )
        if L2:
            dq = _l2norm_bwd(q, rstd[0], dq, q.dtype)
            dk = _l2norm_bwd(k, rstd[1], dk, k.dtype)
        dh0 = None if h0 is None else dh0.to(h0.dtype)
        return dq, dk, dv, dg, dbeta, dh0, None, None, None, None


@contextlib.contextmanager
def _interpret_mode(on: bool):
    """Temporarily set TRITON_INTERPRET (and drop a knobs override) so triton.jit decorates in
    the requested mode."""
    runtime = triton.knobs.runtime
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_knob = runtime.__dict__.pop("interpret", None)
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        if saved_knob is not None:
            runtime.__dict__["interpret"] = saved_knob


_MODE_LOCK = threading.Lock()


def _module_in_mode(module: ModuleType, interpret: bool) -> ModuleType:
    """``module`` (a kernels module with an ``_INTERPRETED`` flag) if its kernels were decorated
    in the requested mode, else a cached copy of it executed again in that mode.

    CPU tensors run in Triton's interpreter and CUDA tensors on compiled kernels, whatever
    TRITON_INTERPRET was when the module was first imported; nested ``@triton.jit`` helpers
    resolve through the copy's own globals, so both modes can live in one process.
    """
    if module._INTERPRETED == interpret:
        return module
    base = module.__name__.removesuffix("__interpreted").removesuffix("__compiled")
    name = f"{base}__{'interpreted' if interpret else 'compiled'}"
    with _MODE_LOCK:
        copy = sys.modules.get(name)
        if copy is None:
            spec = importlib.util.spec_from_file_location(name, module.__file__)
            copy = importlib.util.module_from_spec(spec)
            sys.modules[name] = copy  # (dataclasses look their module up while executing)
            try:
                with _interpret_mode(interpret):
                    spec.loader.exec_module(copy)
            except BaseException:
                del sys.modules[name]
                raise
    return copy


def chunk_gated_delta_rule_triton(
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
    """Chunked gated delta rule on our Triton kernels (inputs validated by :mod:`.api`).

    CUDA tensors run compiled kernels; CPU tensors run the same kernels in Triton's interpreter
    (slow; for tests).

    Returns ``(o [B, T, H, V] in q.dtype, final_state [N, H, K, V] float32 or None)``.
    """
    impl = _module_in_mode(sys.modules[__name__], interpret=not q.is_cuda)
    return impl._chunk_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
        use_qk_l2norm_in_kernel,
    )  # fmt: skip


def _chunk_gated_delta_rule(
    q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel
):
    B, T, H, K = q.shape
    V = v.shape[-1]
    if not (16 <= K <= 256 and 16 <= V <= 256):
        raise ValueError(f"triton GDN kernels support 16 <= K, V <= 256, got K={K}, V={V}")
    if scale is None:
        scale = K**-0.5
    if cu_seqlens is None:
        offsets = [b * T for b in range(B + 1)]
    else:
        offsets = [int(x) for x in cu_seqlens.tolist()]
    lay = _layout(offsets, q.device)
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = _ChunkGatedDeltaRule.apply(
        q.reshape(B * T, H, K).contiguous(),
        k.reshape(B * T, H, K).contiguous(),
        v.reshape(B * T, H, V).contiguous(),
        g.reshape(B * T, H).contiguous(),
        beta.reshape(B * T, H).contiguous(),
        h0,
        float(scale),
        lay,
        _dot_mode(q.dtype),
        bool(use_qk_l2norm_in_kernel),
    )
    return o.reshape(B, T, H, V), (ht if output_final_state else None)
