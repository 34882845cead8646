"""The THD plan of the TE-spec CP attention (layers/te_cp_attention.py), on CPU.

1. The (query, key) pairs the plan lets attend — per segment, bottom-right-aligned causal over
   its keys — are exactly the document-causal pairs of the full row (brute force from global
   positions and document ids, as the local spec's mask), each pair once.
2. The local compute with a torch stand-in for TE's THD kernel (same contract: per-segment
   bottom-right causal) reproduces full-row attention outputs and dq/dk/dv when the CP ranks are
   simulated in one process (what tests/gpu/test_te_cp_attention.py checks with TE itself).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_hybrid.layers import te_cp_attention as tca
from megatron_hybrid.parallel import context

N = 96

# document starts (besides 0): inside chunks, exactly at chunk boundaries (CP 2: 24, 48, 72;
# CP 4: every 12), a one-token document, a document spanning several chunks
ROWS = {
    "many": [0, 5, 12, 13, 30, 48, 50, 77, 95],
    "one_document": [0],
    "long_then_short": [0, 70, 71, 84],
}


def brute_force_pairs(starts, rank, cp):
    """{(local query row, gathered key row)} that attend in the 1-rank model."""
    cu = torch.tensor(starts + [N])
    pos_q = context.zigzag_positions(N, rank, cp)
    pos_k = torch.cat([context.zigzag_positions(N, i, cp) for i in range(cp)])
    doc_q, doc_k = context.document_ids(pos_q, cu), context.document_ids(pos_k, cu)
    mask = (doc_q[:, None] == doc_k[None, :]) & (pos_q[:, None] >= pos_k[None, :])
    return {tuple(p) for p in mask.nonzero().tolist()}


def plan_pairs(plan: tca.THDPlan):
    """[(local query row, gathered key row)] the THD call attends, with multiplicity."""
    pairs = []
    cu_q, cu_kv = plan.cu_seqlens_q.tolist(), plan.cu_seqlens_kv.tolist()
    for s in range(len(cu_q) - 1):
        sq, skv = cu_q[s + 1] - cu_q[s], cu_kv[s + 1] - cu_kv[s]
        keys = plan.kv_rows[cu_kv[s] : cu_kv[s + 1]].tolist()
        for i in range(sq):
            pairs += [(cu_q[s] + i, keys[j]) for j in range(i + skv - sq + 1)]
    return pairs


@pytest.mark.parametrize("row", list(ROWS))
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_plan_matches_document_causal_mask(row, cp):
    starts = ROWS[row]
    for rank in range(cp):
        plan = tca.build_thd_plan(starts, N, rank, cp)
        pairs = plan_pairs(plan)
        assert len(pairs) == len(set(pairs))  # no key attended twice by one query
        assert set(pairs) == brute_force_pairs(starts, rank, cp), (row, cp, rank)
        lens_q = (plan.cu_seqlens_q[1:] - plan.cu_seqlens_q[:-1]).tolist()
        lens_kv = (plan.cu_seqlens_kv[1:] - plan.cu_seqlens_kv[:-1]).tolist()
        assert plan.cu_seqlens_q.dtype == plan.cu_seqlens_kv.dtype == torch.int32
        assert int(plan.cu_seqlens_q[-1]) == N // cp  # the queries are the local tokens, in order
        assert all(0 < q <= k for q, k in zip(lens_q, lens_kv))
        assert (plan.max_seqlen_q, plan.max_seqlen_kv) == (max(lens_q), max(lens_kv))


def test_segments_split_chunks_at_document_starts():
    # CP 2, chunks of 24: rank 0 holds chunks 0 and 3 ([0, 24) and [72, 96))
    assert tca.segments([0, 5, 30, 77], N, 0, 2) == [
        (0, 5, 0),
        (5, 24, 5),
        (72, 77, 30),
        (77, 96, 77),
    ]


def torch_thd_attend(q, k, v, plan):
    """Reference for TE's THD call: per segment, bottom-right-aligned causal SDPA (fp32)."""
    out = []
    cu_q, cu_kv = plan.cu_seqlens_q.tolist(), plan.cu_seqlens_kv.tolist()
    n, g = q.shape[1], k.shape[1]
    for s in range(len(cu_q) - 1):
        qs = q[cu_q[s] : cu_q[s + 1]].transpose(0, 1)  # [n, sq, d]
        ks = k[cu_kv[s] : cu_kv[s + 1]].transpose(0, 1).repeat_interleave(n // g, 0)
        vs = v[cu_kv[s] : cu_kv[s + 1]].transpose(0, 1).repeat_interleave(n // g, 0)
        sq, skv = qs.shape[1], ks.shape[1]
        allowed = torch.ones(sq, skv, dtype=torch.bool).tril(diagonal=skv - sq)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed).transpose(0, 1))
    return torch.cat(out).flatten(1)


def full_row_reference(q, k, v, starts):
    n, g = q.shape[1], k.shape[1]
    cu = torch.tensor(starts + [N])
    doc = context.document_ids(torch.arange(N), cu)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(N, N, dtype=torch.bool).tril()
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1).repeat_interleave(n // g, 0),
        v.transpose(0, 1).repeat_interleave(n // g, 0),
        attn_mask=mask,
    )
    return o.transpose(0, 1).flatten(1)


@pytest.mark.parametrize("cp", [2, 4])
def test_local_compute_with_torch_kernel_matches_full_row(cp):
    torch.manual_seed(0)
    starts, n, g, d = ROWS["many"], 4, 2, 8
    q = torch.randn(N, n, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(N, g, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(N, g, d, dtype=torch.float64, requires_grad=True)
    gout = torch.randn(N, n * d, dtype=torch.float64)
    ref = full_row_reference(q, k, v, starts)
    ref_grads = torch.autograd.grad((ref * gout).sum(), (q, k, v))

    out = torch.empty_like(ref)
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    rank_major = torch.cat([context.zigzag_positions(N, i, cp) for i in range(cp)])
    for rank in range(cp):
        pos = context.zigzag_positions(N, rank, cp)
        plan = tca.build_thd_plan(starts, N, rank, cp)
        # what all_gather_cp returns on every rank: all ranks' local K/V, rank-major
        o = tca.local_attention_thd(q[pos], k[rank_major], v[rank_major], plan, torch_thd_attend)
        out[pos] = o.detach()
        for acc, gr in zip(grads, torch.autograd.grad((o * gout[pos]).sum(), (q, k, v))):
            acc += gr  # dk, dv summed over ranks, as the all-gather backward does
    torch.testing.assert_close(out, ref.detach())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
