"""Context-parallel attention for the TE spec: our all-gather-KV CP with TE's THD kernels.

Shape legend: N tokens in the packed row, c CP size, L = N / (2c) tokens per chunk, T = 2L local
tokens, S = c T = N gathered tokens, n query heads and G KV heads on this TP rank, d head dim.

Why not TE's own CP attention: with packed documents (THD) it splits *every document* into 2c
zigzag pieces (each document padded to a multiple of 2c), while our layout splits the *row* into
2c chunks, the layout GDN's state passing shares (parallel/context.py). So, as in the local spec,
each rank all-gathers K and V of the whole row (``context.all_gather_cp``: the backward sums the
K/V gradients back to their owners) and attends its own queries; only the local compute runs on
TE's fused/flash kernel instead of a dense masked SDPA.

The local compute as one THD call: the rank's two chunks are cut at document starts into
segments; a segment holds the queries at global positions [a, b) of the document starting at d0
and attends the keys at [d0, b). With q-length b - a <= kv-length b - d0, "causal" is aligned at
the bottom right (query a + i sees keys up to a + i), TE's ``padding_causal_bottom_right``. The
queries of all segments are the local tokens in local order (no copy); the keys are gathered into
one packed [sum(b - d0), G, d] tensor with an index (a key row used by several segments is copied
for each; the index_select backward sums their gradients).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_hybrid.parallel import context

# TE's mask name for per-sequence causal attention aligned at the bottom right (THD needs a
# "padding" mask type; no padding is present, the cu_seqlens just delimit the segments).
TE_MASK_TYPE = "padding_causal_bottom_right"


def segments(
    doc_starts: list[int], row_length: int, cp_rank: int, cp_size: int
) -> list[tuple[int, int, int]]:
    """This rank's query segments in local order: ``(a, b, d0)`` = global query positions [a, b)
    of the document that starts at d0 (d0 <= a). ``doc_starts`` sorted, containing 0."""
    L = row_length // (2 * cp_size)
    out = []
    for j in context.zigzag_chunks(cp_rank, cp_size):
        lo, hi = j * L, (j + 1) * L
        cuts = [lo] + [d for d in doc_starts if lo < d < hi] + [hi]
        for a, b in zip(cuts[:-1], cuts[1:]):
            d0 = doc_starts[bisect.bisect_right(doc_starts, a) - 1]
            out.append((a, b, d0))
    return out


def gathered_row_of_position(row_length: int, cp_size: int, device=None) -> torch.Tensor:
    """``[N]``: for each global position, its row in the all-gathered K/V ``[c x T]``, which is
    rank-major (rank i's local tokens at rows [i T, (i+1) T), each rank in its zigzag order)."""
    pos_S = torch.cat(
        [context.zigzag_positions(row_length, i, cp_size, device=device) for i in range(cp_size)]
    )
    rows = torch.empty_like(pos_S)
    rows[pos_S] = torch.arange(pos_S.numel(), device=device)
    return rows


@dataclass(frozen=True)
class THDPlan:
    """Arguments of the THD attention call for one CP rank (same for every attention layer of a
    micro-batch). ``kv_rows`` indexes the gathered K/V; ``cu_seqlens_*`` int32 ``[segments+1]``."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_kv: torch.Tensor
    max_seqlen_q: int
    max_seqlen_kv: int
    kv_rows: torch.Tensor


def build_thd_plan(
    doc_starts: list[int], row_length: int, cp_rank: int, cp_size: int, device=None
) -> THDPlan:
    segs = segments(doc_starts, row_length, cp_rank, cp_size)
    q_lens = [b - a for a, b, _ in segs]
    kv_lens = [b - d0 for _, b, d0 in segs]
    cu_q = torch.tensor([0] + q_lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    cu_kv = torch.tensor([0] + kv_lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    # every segment's keys are one contiguous run of global positions [d0, b)
    kv_positions = torch.cat([torch.arange(d0, b) for _, b, d0 in segs])
    kv_rows = gathered_row_of_position(row_length, cp_size)[kv_positions]
    return THDPlan(
        cu_seqlens_q=cu_q.to(device),
        cu_seqlens_kv=cu_kv.to(device),
        max_seqlen_q=max(q_lens),
        max_seqlen_kv=max(kv_lens),
        kv_rows=kv_rows.to(device),
    )


def plan_for(params: context.ContextParallelParams, device) -> THDPlan:
    """The plan of this micro-batch, built once (host work) and shared by its attention layers
    (cached on the params object, which the trainer makes per micro-batch)."""
    plan = getattr(params, "_te_thd_plan", None)
    if plan is None:
        plan = build_thd_plan(
            params.doc_starts(), params.row_length, params.cp_rank, params.cp_size, device
        )
        params._te_thd_plan = plan
    return plan


# attend(q [t_q, n, d], k [t_kv, G, d], v [t_kv, G, dv], plan) -> [t_q, n * dv] (or [t_q, n, dv])
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, THDPlan], torch.Tensor]


def local_attention_thd(
    q_Tnd: torch.Tensor,
    k_SGd: torch.Tensor,
    v_SGd: torch.Tensor,
    plan: THDPlan,
    attend: Attend,
) -> torch.Tensor:
    """This rank's attention output ``[T, n * dv]`` from its queries (local order) and the
    all-gathered keys/values (rank-major, as ``all_gather_cp`` returns them)."""
    k_tGd = k_SGd.index_select(0, plan.kv_rows)  # contiguous, as TE's THD layout wants
    v_tGd = v_SGd.index_select(0, plan.kv_rows)
    out = attend(q_Tnd.contiguous(), k_tGd, v_tGd, plan)
    return out.reshape(q_Tnd.shape[0], -1)


def te_attend(dpa, te_forward: Callable | None = None) -> Attend:
    """An ``attend`` that runs Transformer Engine's DotProductAttention ``dpa`` in THD form.

    ``dpa`` must be built with ``attention_type="cross"`` (query and key lengths differ per
    segment; TE's self-attention paths assume equal cu_seqlens) and without a CP group (this is
    the local compute). ``te_forward`` is the TE forward to call (default: the module itself;
    megatron's wrapper passes TE's own ``DotProductAttention.forward`` to skip its sbhd logic).
    """
    fwd = te_forward or dpa

    def attend(q, k, v, plan: THDPlan):
        return fwd(
            q,
            k,
            v,
            None,
            qkv_format="thd",
            cu_seqlens_q=plan.cu_seqlens_q,
            cu_seqlens_kv=plan.cu_seqlens_kv,
            max_seqlen_q=plan.max_seqlen_q,
            max_seqlen_kv=plan.max_seqlen_kv,
            attn_mask_type=TE_MASK_TYPE,
        )

    return attend


def cp_attention_sbhd(
    q_sbnd: torch.Tensor,
    k_sbGd: torch.Tensor,
    v_sbGd: torch.Tensor,
    params: context.ContextParallelParams,
    attend: Attend,
) -> torch.Tensor:
    """Core attention under CP with megatron's shapes: local ``q [s, 1, n, d]``, ``k, v [s, 1,
    G, d]`` -> ``[s, 1, n * dv]``. K and V are gathered in one collective (concatenated)."""
    s, b = q_sbnd.shape[:2]
    if b != 1:
        raise ValueError(f"context parallelism needs one packed row (batch 1), got {b}")
    dk = k_sbGd.shape[-1]
    kv_sGX = torch.cat([k_sbGd, v_sbGd], dim=-1)[:, 0]
    kv_SGX = context.all_gather_cp(kv_sGX, params.cp_group).flatten(0, 1)  # [c s, G, dk + dv]
    out = local_attention_thd(
        q_sbnd[:, 0], kv_SGX[..., :dk], kv_SGX[..., dk:], plan_for(params, q_sbnd.device), attend
    )
    return out.view(s, 1, -1)
