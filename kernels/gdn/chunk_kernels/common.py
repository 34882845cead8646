"""Device helpers shared by the chunked GDN kernels: sums and scans that work in both of
Triton's modes, the dot-product modes, pointer tiles of the token-major and chunk-major buffers,
the in-chunk decay matrix and the UT inverse. See :mod:`kernels.gdn.triton_chunk` for the maths."""

from __future__ import annotations

import triton
import triton.language as tl

# triton.jit picks compiled kernels or the CPU interpreter when it decorates, i.e. at import.
# Kernels of this package were decorated in this mode; triton_chunk._kernel_package builds the
# other mode's copy when a call needs it.
_INTERPRETED = bool(triton.knobs.runtime.interpret)

# ----------------------------------------------------------------------------------------------
# small device helpers
# ----------------------------------------------------------------------------------------------


# Sums and scans call tl.reduce / tl.associative_scan with triton's own sum combiner rather than
# tl.sum / tl.cumsum, and zeros come from tl.full rather than tl.zeros: those three are
# @triton.jit functions of triton.language, decorated once when triton is imported, which a
# package copy built for the interpreter later in the process (triton_chunk._kernel_package)
# cannot call. The interpreter recognises the sum combiner and reduces with numpy.


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


@triton.jit
def _state_pass_program(
    seq_chunk0_ptr, seq_nchunks_ptr, seq_tok0_ptr, seq_len_ptr, init_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr,
):  # fmt: skip
    """What a state-pass program [V/BV, N*H] works on: its V offset, sequence, head, first chunk,
    chunk count, first token, length, and its [KP, BV] slice of the running state (from init_ptr
    [N, H, K, V] if HAS_INIT, else zeros) with the slice's mask."""
    v0 = tl.program_id(0) * BV
    s = tl.program_id(1) // H
    h = tl.program_id(1) % H
    ptrs, mask = _state_ptrs(init_ptr, s, h, 0, v0, H, K, V, KP, BV)
    if HAS_INIT:
        S_KV = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        S_KV = tl.full([KP, BV], 0.0, tl.float32)
    c0 = tl.load(seq_chunk0_ptr + s)
    nc = tl.load(seq_nchunks_ptr + s)
    bos = tl.load(seq_tok0_ptr + s)
    L = tl.load(seq_len_ptr + s)
    return v0, s, h, c0, nc, bos, L, S_KV, mask
