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
from megatron_hybrid.errors import ConfigError

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


def global_chunk_order(gathered_c2X: torch.Tensor) -> torch.Tensor:
    """Per-rank pairs ``[c, 2, *]`` (rank i: chunks i, 2c-1-i) -> global order ``[2c, *]``."""
    return torch.cat([gathered_c2X[:, 0], gathered_c2X[:, 1].flip(0)], dim=0)
