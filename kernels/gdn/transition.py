"""Linear part of the Gated DeltaNet recurrence over a segment, for context parallelism.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N segments (sequences),
M chunks, C chunk size.

Per head the recurrence is affine in the state::

    S_t = M_t S_{t-1} + beta_t k_t v_t^T,      M_t = exp(g_t) (I - beta_t k_t k_t^T)   [K, K]

so over a segment of tokens 1..L, ``S_L = A S_0 + B`` with ``A = M_L ... M_1`` (later steps on
the left) and ``B`` the final state reached from ``S_0 = 0`` (which the chunked kernels already
return as ``final_state``). :func:`segment_transition` returns ``A``; ``A`` does not depend on
``v`` (nor on ``q`` or ``scale``).

Exact specification of :func:`segment_transition`:

- Without ``cu_seqlens``: ``A[n]`` is the product over all T tokens of batch row n (N = B).
- With ``cu_seqlens`` ([N + 1] offsets, B == 1): ``A[n]`` is the product over the tokens of
  sequence n *alone*, i.e. exactly the linear part of the map ``initial_state[n] ->
  final_state[n]`` of :func:`~.api.chunk_gated_delta_rule` called with the same ``cu_seqlens``::

      final_state[n](S0) == A[n] @ S0[n] + final_state[n](0)          for every n

  An empty sequence has ``A[n] = I`` (its state passes through unchanged).

Use under context parallelism (state passing). A CP rank holds one contiguous shard of the
packed token stream, with its *local* ``cu_seqlens`` (offsets 0..L). Let ``S_in`` be the state
at the end of the previous shard. Only the shard's first local sequence (tokens
``[0, first_doc_len)``, ``first_doc_len = cu_seqlens[1]``) can depend on ``S_in``, and only if
that sequence continues a document of the previous shard (no document starts at local
token 0). The map from ``S_in`` to the state at the shard END is then (see
:func:`shard_affine_map`)::

    S_end = A_shard @ S_in + B_shard,   B_shard = final_state[N-1](0)
    A_shard = A[0]   if N == 1 and the shard's first token continues the previous document
            = 0      otherwise (a document boundary lies inside or at the start of the shard:
                     the state was reset, so S_end does not depend on S_in)

Across ranks the shard maps compose like the steps themselves (a scan over ranks):
``S_end[r] = A_shard[r] @ S_end[r-1] + B_shard[r]``, so each rank's ``S_in`` follows from the
``(A_shard, B_shard)`` of the ranks before it.

The first sequence's own outputs and final state need ``S_in`` itself (not A): rerun, or
correct, the first ``first_doc_len`` tokens with ``initial_state = S_in``; every later sequence in
the shard is independent of ``S_in``.

Computation (chunked, fp32): per chunk of C tokens, the product of its steps is, in the WY /
UT-transform form of :mod:`.chunk_torch` (G the in-chunk cumulative log decay, ``A_tj =
beta_t (k_t . k_j) exp(G_t - G_j)`` strictly lower triangular, ``W = (I + A)^-1 (beta exp(G) k)``)::

    P_chunk = exp(G_C) I - (k exp(G_C - G))^T W

i.e. the chunked state update ``S_next = exp(G_C) S + (k exp(G_C - G))^T (U - W S)`` with
``U = 0``. Each segment's chunk products are then multiplied pairwise in a balanced tree
(log2 of the longest segment's chunk count batched matmuls). Entries below fp32's range
(strong decay over long segments) flush to 0.
"""

from __future__ import annotations

import torch

from .naive import l2norm


def _check(k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, cu_seqlens) -> list[int] | None:
    if k.dim() != 4:
        raise ValueError(f"k must be [B, T, H, K], got shape {tuple(k.shape)}")
    B, T, H, _ = k.shape
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}], got {tuple(x.shape)}")
    if cu_seqlens is None:
        return None
    if B != 1:
        raise ValueError(f"cu_seqlens packs sequences into one row: B must be 1, got {B}")
    offsets = [int(x) for x in cu_seqlens.tolist()]
    if (
        len(offsets) < 2
        or offsets[0] != 0
        or offsets[-1] != T
        or any(b < a for a, b in zip(offsets[:-1], offsets[1:]))
    ):
        raise ValueError(
            f"cu_seqlens must be non-decreasing offsets from 0 to T={T}, got {offsets}"
        )
    return offsets


def segment_transition_naive(
    k: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> torch.Tensor:
    """Float64 reference: the product of the per-token ``exp(g_t) (I - beta_t k_t k_t^T)``,
    one token at a time. Same arguments and semantics as :func:`segment_transition`; returns
    ``A [N, H, K, K]`` in float64 (differentiable)."""
    offsets = _check(k, g, beta, cu_seqlens)
    B, T, H, K = k.shape
    f64 = torch.float64
    k, g, beta = k.to(f64), g.to(f64), beta.to(f64)
    if use_qk_l2norm_in_kernel:
        k = l2norm(k)
    rows = [(b, 0, T) for b in range(B)] if offsets is None else []
    if offsets is not None:
        rows = [(0, s, e) for s, e in zip(offsets[:-1], offsets[1:])]
    eye = torch.eye(K, dtype=f64, device=k.device)
    out = []
    for b, s, e in rows:
        A_HKK = eye.expand(H, K, K)
        for t in range(s, e):
            k_HK = k[b, t]
            step_HKK = eye - beta[b, t][:, None, None] * k_HK[:, :, None] * k_HK[:, None, :]
            A_HKK = g[b, t].exp()[:, None, None] * (step_HKK @ A_HKK)
        out.append(A_HKK)
    if not out:
        return k.new_zeros(0, H, K, K)
    return torch.stack(out, dim=0)


def segment_transition(
    k: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Transition matrices of the gated delta rule over whole segments (see the module doc).

    Args:
        k: ``[B, T, H, K]`` keys (as passed to ``chunk_gated_delta_rule``).
        g: ``[B, T, H]`` log decay (``<= 0``).
        beta: ``[B, T, H]``.
        cu_seqlens: optional int ``[N + 1]`` offsets of sequences packed in one row (B == 1).
        use_qk_l2norm_in_kernel: L2-normalise k per head first, as the GDN op does.
        chunk_size: tokens per chunk of the WY form.

    Returns:
        ``A [N, H, K, K]`` float32, ``A[n] = prod_t exp(g_t)(I - beta_t k_t k_t^T)`` over
        segment n (later tokens on the left), so ``S_end = A[n] @ S_start + final_state(0)``.
        N = B without ``cu_seqlens``, else the number of sequences. Differentiable (torch ops).
    """
    offsets = _check(k, g, beta, cu_seqlens)
    B, T, H, K = k.shape
    Cs = chunk_size
    f32 = torch.float32
    dev = k.device
    k_BTHK, g_BTH, beta_BTH = k.to(f32), g.to(f32), beta.to(f32)
    if use_qk_l2norm_in_kernel:
        k_BTHK = l2norm(k_BTHK)
    if offsets is None:  # B rows of T tokens are B segments of one flattened stream
        offsets = [b * T for b in range(B + 1)]
    N = len(offsets) - 1

    # ---- chunk-aligned layout: each segment right-padded to whole chunks with neutral tokens
    # (k = g = beta = 0, an identity step); an empty segment gets one all-padding chunk (A = I).
    gather, seg_of_chunk = [], []
    for n, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        n_chunks = max(1, -(-(e - s) // Cs))
        gather.extend(range(s, e))
        gather.extend([B * T] * (n_chunks * Cs - (e - s)))  # index B*T: appended zero token
        seg_of_chunk.extend([n] * n_chunks)
    M = len(seg_of_chunk)
    idx = torch.tensor(gather, dtype=torch.long, device=dev)

    def _chunks(x: torch.Tensor) -> torch.Tensor:
        """[B, T, H, *] -> [H, M, C, *]"""
        flat = x.reshape((B * T,) + x.shape[2:])
        flat = torch.cat([flat, flat.new_zeros((1,) + flat.shape[1:])], dim=0)
        x_MC = flat.index_select(0, idx).reshape((M, Cs) + flat.shape[1:])
        return x_MC.movedim(2, 0)

    k_HMCK, g_HMC, beta_HMC = _chunks(k_BTHK), _chunks(g_BTH), _chunks(beta_BTH)

    # ---- per-chunk transition in the WY form; cumulative decays and their differences in
    # float64, as in chunk_torch (they cancel badly in fp32 under strong decay)
    G64_HMC = g_HMC.to(torch.float64).cumsum(dim=-1)
    G_HMC = G64_HMC.to(f32)
    G_tail_HMC = (G64_HMC[..., -1:] - G64_HMC).to(f32)
    causal_CC = torch.ones(Cs, Cs, dtype=torch.bool, device=dev).tril()
    log_decay_HMCC = (G64_HMC[..., :, None] - G64_HMC[..., None, :]).to(f32)
    decay_HMCC = log_decay_HMCC.masked_fill(~causal_CC, float("-inf")).exp()
    kbeta_HMCK = k_HMCK * beta_HMC[..., None]
    A_HMCC = torch.tril((kbeta_HMCK @ k_HMCK.transpose(-1, -2)) * decay_HMCC, diagonal=-1)
    W_HMCK = torch.linalg.solve_triangular(
        A_HMCC, kbeta_HMCK * G_HMC.exp()[..., None], upper=False, unitriangular=True
    )
    ktail_HMCK = k_HMCK * G_tail_HMC.exp()[..., None]
    eye_KK = torch.eye(K, dtype=f32, device=dev)
    P_HMKK = G_HMC[..., -1].exp()[..., None, None] * eye_KK - (
        ktail_HMCK.transpose(-1, -2) @ W_HMCK
    )

    # ---- ordered product of each segment's chunks (later chunks on the left), as a balanced
    # tree: every level multiplies neighbouring pairs of the same segment in one batched matmul.
    seg = seg_of_chunk
    while len(seg) > N:
        left, right, new_seg = [], [], []
        i = 0
        while i < len(seg):
            paired = i + 1 < len(seg) and seg[i + 1] == seg[i]
            left.append(i)
            right.append(i + 1 if paired else i)
            new_seg.append(seg[i])
            i += 2 if paired else 1
        li = torch.tensor(left, device=dev)
        ri = torch.tensor(right, device=dev)
        is_pair = (ri != li)[None, :, None, None]
        P_left = P_HMKK.index_select(1, li)
        prod = P_HMKK.index_select(1, ri) @ P_left
        P_HMKK = torch.where(is_pair, prod, P_left)
        seg = new_seg
    return P_HMKK.transpose(0, 1).contiguous()  # [N, H, K, K]


def shard_affine_map(
    A_NHKK: torch.Tensor,
    final_state_NHKV: torch.Tensor,
    continues_previous: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_shard [H, K, K], B_shard [H, K, V])`` with ``S_end = A_shard @ S_in + B_shard`` for a
    context-parallel shard (see the module doc).

    Args:
        A_NHKK: :func:`segment_transition` of the shard with its local ``cu_seqlens``.
        final_state_NHKV: the shard's per-sequence final states started from zero.
        continues_previous: False if a document starts at the shard's first token.
    """
    N = A_NHKK.shape[0]
    B_shard = final_state_NHKV[-1]
    if N == 1 and continues_previous:
        return A_NHKK[0], B_shard
    return torch.zeros_like(A_NHKK[0]), B_shard
