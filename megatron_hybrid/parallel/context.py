"""Context parallelism (CP): the sequence layout, and GDN / conv / attention across CP ranks.

Shape legend: N tokens in the packed row (micro_batch * seq_length), c CP size, r CP rank,
L = N / (2c) tokens per chunk, T = 2L tokens on this rank, H heads on this (TP) rank, K key and
V value head dims, C conv channels, W conv width, n query heads, G KV heads, d head dim.

**Layout** (megatron's load-balanced "zigzag", the layout its attention CP and RoPE slicing
use): the packed row is cut into 2c chunks of L tokens; CP rank r holds chunks r and 2c-1-r,
concatenated. Every rank then has the same causal-attention work, and a GDN layer processes two
contiguous chunks.

**GDN by state passing** (not head-parallel all-to-all, so any CP size works with any head
count). Per head the recurrence over a chunk j is affine in its incoming state::

    S_end(j) = A_j S_in(j) + B_j,       A_j [K, K], B_j [K, V]

with B_j the final state from a zero initial state and A_j the product of the chunk's
transitions (``kernels.gdn.transition``; A_j = 0 when a document starts inside or at the start
of the chunk, because the state is reset there). Each rank computes (A_j, B_j) for its two
chunks, all-gathers them (O(H K (K + V)) numbers per rank, independent of the sequence length),
runs the tiny scan ``S_in(0) = 0, S_in(j+1) = A_j S_in(j) + B_j`` redundantly, and reruns the
first document of each of its chunks with ``initial_state = S_in(j)``. The causal conv before
the recurrence needs the W-1 pre-conv rows before each chunk (a "halo"), all-gathered too.
All gathers are autograd functions whose backward sums the gradient over the CP group and
keeps this rank's slice, so gradients equal those of the 1-rank model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_hybrid import mcore
from megatron_hybrid.kernels.conv import causal_conv1d
from megatron_hybrid.kernels.gdn import chunk_gated_delta_rule
from megatron_hybrid.kernels.gdn.transition import segment_transition
from megatron_hybrid.models.olmo_hybrid.config import ConfigError

# ---- layout ---------------------------------------------------------------------------------


def check_layout(
    row_length: int,
    context_parallel: int,
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
    conv_kernel: int = 4,
    micro_batch_size: int | None = None,
    seq_length: int | None = None,
) -> None:
    """Raise a ConfigError naming the numbers if the packed row cannot be split over CP ranks.

    Needs: ``row_length`` (micro_batch * seq_length) divisible by 2 x CP (two chunks per rank);
    with sequence parallelism each rank's 2 chunks divisible by TP; a chunk at least W-1 tokens
    (the conv halo comes from the previous chunk alone).
    """
    c = context_parallel
    if c <= 1:
        return
    what = (
        f"micro_batch_size x seq_length = {micro_batch_size} x {seq_length} = {row_length}"
        if micro_batch_size is not None and seq_length is not None
        else f"the packed row length {row_length}"
    )
    if row_length % (2 * c):
        raise ConfigError(
            f"context parallelism: {what} is not divisible by 2 x CP = 2 x {c} = {2 * c} "
            "(each CP rank holds two of 2 x CP equal chunks)"
        )
    local = row_length // c
    if sequence_parallel and local % tensor_parallel:
        raise ConfigError(
            f"context + sequence parallelism: the {local} tokens per CP rank ({what} / CP {c}) "
            f"are not divisible by TP={tensor_parallel}"
        )
    chunk = row_length // (2 * c)
    if chunk < conv_kernel - 1:
        raise ConfigError(
            f"context parallelism: chunks of {chunk} tokens ({what} / (2 x CP {c})) are shorter "
            f"than the GDN conv halo of conv_kernel - 1 = {conv_kernel - 1} tokens"
        )


def check_run_config(run, dry_run: bool = False) -> None:
    """Reject a RunConfig whose CP layout the model cannot run (before any process group or
    model exists): the row split (:func:`check_layout`) and, for the te spec, a usable
    Transformer Engine (not for ``--dry-run``, which plans GPU jobs on hosts without it)."""
    p, t = run.parallel, run.train
    if p.context <= 1:
        return
    check_layout(
        t.micro_batch_size * run.data.seq_length,
        p.context,
        p.tensor,
        p.sequence_parallel,
        run.model.gdn_conv_kernel,
        micro_batch_size=t.micro_batch_size,
        seq_length=run.data.seq_length,
    )
    from megatron_hybrid.models.olmo_hybrid.model import default_flavour  # (import cycle)

    flavour = default_flavour() if t.spec == "auto" else t.spec
    if flavour == "te" and not dry_run:
        # the te spec runs CP attention too (layers/te_cp_attention.py), but needs TE itself:
        # say so now rather than after the process groups are up
        try:
            mcore.te_modules()
        except (ImportError, RuntimeError) as e:
            raise ConfigError(
                f"context parallel size {p.context} with the 'te' layer spec: Transformer Engine "
                f"is not usable here ({e}); without it CP needs the local layer spec (--spec local)"
            ) from e


def zigzag_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two global chunk indices held by ``cp_rank``: (r, 2c-1-r)."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def zigzag_positions(row_length: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions of this rank's tokens, in local order. ``[N / c]`` int64."""
    L = row_length // (2 * cp_size)
    a, b = zigzag_chunks(cp_rank, cp_size)
    return torch.cat(
        [
            torch.arange(a * L, (a + 1) * L, device=device),
            torch.arange(b * L, (b + 1) * L, device=device),
        ]
    )


def split_for_rank(x_bN: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """This rank's zigzag share of a packed row along dim 1: ``[b, N] -> [b, N / c]``."""
    b, N = x_bN.shape[:2]
    chunks = x_bN.view(b, 2 * cp_size, N // (2 * cp_size), *x_bN.shape[2:])
    a, z = zigzag_chunks(cp_rank, cp_size)
    return torch.cat([chunks[:, a], chunks[:, z]], dim=1)


@dataclass
class ContextParallelParams(mcore.PackedSeqParams):
    """PackedSeqParams plus what the layers need under CP (see the module doc).

    ``cu_seqlens_q``/``_kv`` are the GLOBAL document starts over the whole row (as for
    megatron's THD CP), ``max_seqlen_q``/``_kv`` the global row length (megatron's RoPE then
    slices the zigzag positions for this rank), ``positions`` the global position of each local
    token.
    """

    cp_rank: int = 0
    cp_size: int = 1
    row_length: int = 0
    positions: torch.Tensor = None

    @property
    def chunk_length(self) -> int:
        return self.row_length // (2 * self.cp_size)

    @property
    def local_chunks(self) -> tuple[int, int]:
        return zigzag_chunks(self.cp_rank, self.cp_size)

    def doc_starts(self) -> list[int]:
        """Sorted global token indices where a document (or sequence) starts; includes 0."""
        starts = getattr(self, "_starts", None)
        if starts is None:
            cu = [int(x) for x in self.cu_seqlens_q.tolist()]
            starts = sorted({s for s in cu if s < self.row_length} | {0})
            self._starts = starts
        return starts


def context_parallel_params(
    cu_seqlens: torch.Tensor, row_length: int, cp_group
) -> ContextParallelParams:
    """Build the CP packed-sequence parameters for a packed row with GLOBAL ``cu_seqlens``."""
    rank, size = dist.get_rank(cp_group), dist.get_world_size(cp_group)
    return ContextParallelParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=row_length,
        max_seqlen_kv=row_length,
        cp_group=cp_group,
        cp_rank=rank,
        cp_size=size,
        row_length=row_length,
        positions=zigzag_positions(row_length, rank, size, device=cu_seqlens.device),
    )


def is_context_parallel(packed_seq_params) -> bool:
    return isinstance(packed_seq_params, ContextParallelParams) and packed_seq_params.cp_size > 1


# ---- autograd-correct all-gather ------------------------------------------------------------


class _AllGather(torch.autograd.Function):
    """Forward: ``x [*] -> [c, *]`` (rank i's x at index i). Backward: every rank's gradient of
    the gathered tensor is summed and this rank's slice returned (all-reduce + slice: gloo has
    no reduce_scatter; what GDN gathers is K (K + V) numbers per head and chunk)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_cX: torch.Tensor):
        group = ctx.group
        rank = dist.get_rank(group)
        grad_cX = grad_cX.contiguous().clone()
        dist.all_reduce(grad_cX, group=group)
        return grad_cX[rank], None


def all_gather_cp(x: torch.Tensor, group) -> torch.Tensor:
    """``x [*]`` from every rank of ``group`` stacked: ``[c, *]``; gradients summed back."""
    return _AllGather.apply(x, group)


def gather_sequence_cp(x_sX: torch.Tensor, params: ContextParallelParams):
    """All CP ranks' local sequences: ``x [s, *] -> ([c*s, *], positions [c*s])``, rank-major
    (not in global order: ``positions`` gives each row's global token index). Autograd-correct.
    """
    c, s = params.cp_size, x_sX.shape[0]
    x_csX = all_gather_cp(x_sX, params.cp_group)
    pos_cs = torch.stack(
        [zigzag_positions(params.row_length, i, c, device=x_sX.device) for i in range(c)]
    )
    return x_csX.reshape(c * s, *x_sX.shape[1:]), pos_cs.reshape(c * s)


def document_ids(positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Index of the document (packed sequence) holding each global position. ``[P] -> [P]``"""
    cu = cu_seqlens.to(device=positions.device, dtype=torch.long)
    return torch.searchsorted(cu, positions, right=True) - 1


def _global_chunk_order(gathered_c2X: torch.Tensor) -> torch.Tensor:
    """Per-rank pairs ``[c, 2, *]`` (rank i: chunks i, 2c-1-i) -> global order ``[2c, *]``."""
    return torch.cat([gathered_c2X[:, 0], gathered_c2X[:, 1].flip(0)], dim=0)


# ---- causal conv with a halo from the previous chunk ----------------------------------------


def causal_conv1d_cp(
    x_1TC: torch.Tensor,
    weight_CW: torch.Tensor,
    params: ContextParallelParams,
    activation: str = "silu",
) -> torch.Tensor:
    """Causal depthwise conv of this rank's two chunks ``x [1, T, C] -> y [1, T, C]``, equal to
    the 1-rank conv over the whole row (document resets included).

    Each chunk is extended on the left by the last W-1 pre-conv rows of the previous global
    chunk (all-gathered; zeros before chunk 0), the extended chunks are convolved as two packed
    sequences with the global document starts mapped in, and the W-1 halo outputs dropped.
    """
    W = weight_CW.shape[-1]
    L = params.chunk_length
    h = W - 1
    if h == 0:
        return causal_conv1d(x_1TC, weight_CW, activation=activation)
    _, T, C = x_1TC.shape
    tails_2hC = torch.stack([x_1TC[0, L - h : L], x_1TC[0, T - h : T]])
    tails_2chC = _global_chunk_order(all_gather_cp(tails_2hC, params.cp_group))  # [2c, h, C]
    starts = params.doc_starts()
    pieces, cu = [], [0]
    for local, j in enumerate(params.local_chunks):
        halo_hC = tails_2chC[j - 1] if j > 0 else x_1TC.new_zeros(h, C)
        pieces += [halo_hC, x_1TC[0, local * L : (local + 1) * L]]
        lo, base = j * L - h, cu[-1]  # global position of the halo's first row, its local index
        cu += [base + d - lo for d in starts if lo < d < (j + 1) * L]
        cu.append(base + h + L)
    xe_1EC = torch.cat(pieces, dim=0)[None]  # [1, 2(h+L), C]
    cu_t = torch.tensor(cu, dtype=torch.int32, device=x_1TC.device)
    ye_1EC = causal_conv1d(xe_1EC, weight_CW, cu_seqlens=cu_t, activation=activation)
    return torch.cat([ye_1EC[:, h : h + L], ye_1EC[:, 2 * h + L :]], dim=1)


# ---- gated delta rule by state passing ------------------------------------------------------


def _chunk_segments(params: ContextParallelParams) -> list[tuple[list[int], bool]]:
    """Per local chunk: (local document starts in [0, L), continues_previous)."""
    L, out = params.chunk_length, []
    starts = params.doc_starts()
    for j in params.local_chunks:
        local = sorted({0} | {d - j * L for d in starts if j * L < d < (j + 1) * L})
        out.append((local, (j * L) not in starts))
    return out


def gated_delta_rule_cp(
    q_1ThK: torch.Tensor,
    k_1ThK: torch.Tensor,
    v_1ThV: torch.Tensor,
    g_1Th: torch.Tensor,
    beta_1Th: torch.Tensor,
    params: ContextParallelParams,
    scale: float,
    use_qk_l2norm_in_kernel: bool = True,
    backend: str = "auto",
    save_intermediates: bool = False,
) -> torch.Tensor:
    """``chunk_gated_delta_rule`` over the whole packed row, for this rank's two chunks.

    Inputs are this rank's tokens (local order, T = 2L; q, k ``[1, T, H, K]``, v ``[1, T, H,
    V]``, g, beta ``[1, T, H]``); returns ``o [1, T, H, V]`` equal to the 1-rank output at
    those tokens. Steps (module doc): (1) one zero-state pass over both chunks (documents reset
    at the global document starts) gives every document's output except the first document of
    a chunk that continues the previous chunk, and B_j; (2) A_j for chunks that are one
    continuing document; (3) all-gather (A, B), scan for S_in; (4) rerun the continuing first
    documents with ``initial_state = S_in``.
    """
    _, T, H, K = q_1ThK.shape
    V = v_1ThV.shape[-1]
    L, dev = params.chunk_length, q_1ThK.device
    segs = _chunk_segments(params)
    kw = dict(
        scale=scale,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        backend=backend,
        save_intermediates=save_intermediates,
    )

    # (1) zero initial state; both chunks packed as one row, a segment per document piece
    cu = segs[0][0] + [L + s for s in segs[1][0]] + [T]
    o0_1ThV, final_nhKV = chunk_gated_delta_rule(
        q_1ThK,
        k_1ThK,
        v_1ThV,
        g_1Th,
        beta_1Th,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=dev),
        output_final_state=True,
        **kw,
    )
    n_a = len(segs[0][0])
    B_2hKV = torch.stack([final_nhKV[n_a - 1], final_nhKV[-1]]).float()  # end of each chunk

    # (2) A_j: nonzero only for a chunk that is a single continuing document
    A_list = [q_1ThK.new_zeros(H, K, K, dtype=torch.float32) for _ in range(2)]
    whole = [i for i, (starts, cont) in enumerate(segs) if cont and len(starts) == 1]
    if whole:
        A_whKK = segment_transition(
            torch.stack([k_1ThK[0, i * L : (i + 1) * L] for i in whole]),  # [w, L, H, K]
            torch.stack([g_1Th[0, i * L : (i + 1) * L] for i in whole]),  # [w, L, H]
            torch.stack([beta_1Th[0, i * L : (i + 1) * L] for i in whole]),
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )
        for w, i in enumerate(whole):
            A_list[i] = A_whKK[w]

    # (3) all-gather the affine maps of every chunk and scan them (tiny: 2c matmuls per head)
    AB_2hKX = torch.cat([torch.stack(A_list), B_2hKV], dim=-1)  # [2, H, K, K+V]
    AB_ghKX = _global_chunk_order(all_gather_cp(AB_2hKX, params.cp_group))  # [2c, H, K, K+V]
    S_in = [AB_ghKX.new_zeros(H, K, V)]  # S_in[j] [H, K, V]: the state entering global chunk j
    for j in range(max(params.local_chunks)):
        S_in.append(AB_ghKX[j, ..., :K] @ S_in[j] + AB_ghKX[j, ..., K:])

    # (4) rerun each continuing first document with its incoming state (both in one call)
    rerun = [i for i, (_, cont) in enumerate(segs) if cont]
    if not rerun:
        return o0_1ThV
    first_len = {i: (segs[i][0][1] if len(segs[i][0]) > 1 else L) for i in rerun}
    sel = torch.cat([torch.arange(i * L, i * L + first_len[i], device=dev) for i in rerun])
    cu_r = [0]
    for i in rerun:
        cu_r.append(cu_r[-1] + first_len[i])
    o1_1RhV, _ = chunk_gated_delta_rule(
        q_1ThK[:, sel],
        k_1ThK[:, sel],
        v_1ThV[:, sel],
        g_1Th[:, sel],
        beta_1Th[:, sel],
        initial_state=torch.stack([S_in[params.local_chunks[i]] for i in rerun]),  # [R, H, K, V]
        cu_seqlens=torch.tensor(cu_r, dtype=torch.int32, device=dev),
        **kw,
    )
    # splice: the rerun first documents from o1, everything else from o0
    pieces = []
    for i in (0, 1):
        if i in rerun:
            r = rerun.index(i)
            pieces.append(o1_1RhV[:, cu_r[r] : cu_r[r + 1]])
            pieces.append(o0_1ThV[:, i * L + first_len[i] : (i + 1) * L])
        else:
            pieces.append(o0_1ThV[:, i * L : (i + 1) * L])
    return torch.cat(pieces, dim=1)


def gdn_conv_and_recurrence_cp(
    qkv_1TC: torch.Tensor,
    conv_weight_CW: torch.Tensor,
    g_1Th: torch.Tensor,
    beta_1Th: torch.Tensor,
    head_dims: tuple[int, int],
    params: ContextParallelParams,
    backend: str = "auto",
    save_intermediates: bool = False,
) -> torch.Tensor:
    """The GDN mixer's conv + recurrence under CP (what ``OlmoGatedDeltaNet`` runs at CP > 1).

    ``qkv [1, T, C]`` pre-conv per-head ``[q|k|v]`` channels (C = H(2K+V)), ``conv_weight [C,
    W]``, ``g, beta [1, T, H]`` -> ``o [1, T, H, V]``; q and k are L2-normalised in the op and
    the output scale is K^-1/2, as in the 1-rank mixer.
    """
    K, V = head_dims
    _, T, C = qkv_1TC.shape
    if qkv_1TC.shape[0] != 1:
        raise ValueError(f"context parallelism needs one packed row (batch 1), got {qkv_1TC.shape}")
    H = C // (2 * K + V)
    qkv_1TC = causal_conv1d_cp(qkv_1TC, conv_weight_CW, params, activation="silu")
    q_1ThK, k_1ThK, v_1ThV = qkv_1TC.view(1, T, H, 2 * K + V).split([K, K, V], dim=-1)
    return gated_delta_rule_cp(
        q_1ThK, k_1ThK, v_1ThV, g_1Th, beta_1Th, params, scale=K**-0.5, backend=backend,
        save_intermediates=save_intermediates,
    )  # fmt: skip
