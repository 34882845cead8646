"""GDN segment transition A (for context parallelism) vs the float64 per-token product and
the float64 recurrence (CPU, pure PyTorch)."""

import sys
from pathlib import Path

try:
    import kernels  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.gdn.naive import naive_recurrent_gated_delta_rule
from kernels.gdn.transition import (
    segment_transition,
    segment_transition_naive,
    shard_affine_map,
)

H, K, V = 3, 16, 24
TOL = 1e-5  # relative L2 error, fp32 chunked vs float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    ref = b.norm()
    return (a - b).norm().item() if ref == 0 else ((a - b).norm() / ref).item()


def make(B, T, *, l2=False, decay="realistic", seed=0):
    """k (unit norm unless l2norm happens in the op), g <= 0 and beta in (0, 2), as the model."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, T, H, K, generator=gen)
    if not l2:
        k = F.normalize(k, dim=-1)
    beta = 2 * torch.sigmoid(torch.randn(B, T, H, generator=gen))
    x = torch.randn(B, T, H, generator=gen)
    if decay == "realistic":  # A in [1, 16], dt in [1e-3, 1e-1] (the mixer's init ranges)
        A_log = torch.empty(H).uniform_(0.0, math.log(16.0), generator=gen)
        dt = torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp()
        dt_bias = dt + torch.log(-torch.expm1(-dt))
        g = -A_log.exp() * F.softplus(0.5 * x + dt_bias)
    else:  # weak: long memory, so A stays far from zero over many chunks
        g = -1e-3 * F.softplus(x)
    return k, g, beta


def grads(fn, k, g, beta, seed=1, **kw):
    leaves = [t.detach().clone().double().requires_grad_(True) for t in (k, g, beta)]
    if fn is segment_transition:
        leaves = [t.detach().float() for t in leaves]
        leaves = [t.requires_grad_(True) for t in leaves]
    A = fn(*leaves, **kw)
    gen = torch.Generator().manual_seed(seed)
    dA = torch.randn(A.shape, generator=gen, dtype=torch.float64).to(A.dtype)
    return A.detach(), torch.autograd.grad((A * dA).sum(), leaves)


@pytest.mark.parametrize("l2", [False, True], ids=["unit_k", "l2norm_in_kernel"])
@pytest.mark.parametrize("T", [1, 63, 64, 130], ids=lambda t: f"T{t}")
def test_matches_naive_product(T, l2):
    k, g, beta = make(2, T, l2=l2, decay="weak" if T > 64 else "realistic", seed=T)
    A_ref, g_ref = grads(segment_transition_naive, k, g, beta, use_qk_l2norm_in_kernel=l2)
    A, g_out = grads(segment_transition, k, g, beta, use_qk_l2norm_in_kernel=l2)
    assert A.shape == (2, H, K, K) and A.dtype == torch.float32
    errs = {"A": rel_err(A, A_ref)}
    errs.update({n: rel_err(a, b) for n, a, b in zip(["dk", "dg", "dbeta"], g_out, g_ref)})
    assert all(e < TOL for e in errs.values()), errs


@pytest.mark.parametrize("chunk_size", [16, 32])
def test_chunk_sizes(chunk_size):
    k, g, beta = make(1, 75, decay="weak", seed=2)
    A = segment_transition(k, g, beta, chunk_size=chunk_size)
    assert rel_err(A, segment_transition_naive(k, g, beta)) < TOL


def _affine_identity(k, g, beta, cu=None, seed=3):
    """final_state(S_in) == A @ S_in + final_state(0), with the float64 recurrence."""
    B, T = k.shape[:2]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    A = segment_transition(k, g, beta, cu)
    S_in = torch.randn(A.shape[0], H, K, V, generator=gen)
    kw = dict(output_final_state=True, cu_seqlens=cu)
    _, S_end = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=S_in, **kw)
    _, S_zero = naive_recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    return A, S_in, S_end, S_zero


def test_affine_identity_against_recurrence():
    k, g, beta = make(2, 100, decay="weak", seed=4)
    A, S_in, S_end, S_zero = _affine_identity(k, g, beta)
    assert rel_err(A @ S_in + S_zero, S_end) < TOL


def test_packed_sequences():
    """Per-sequence A, incl. length-1 and empty sequences (A = I)."""
    lens = [1, 17, 0, 64, 5, 70]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    k, g, beta = make(1, sum(lens), decay="weak", seed=5)
    A, S_in, S_end, S_zero = _affine_identity(k, g, beta, cu)
    assert A.shape == (len(lens), H, K, K)
    assert rel_err(A, segment_transition_naive(k, g, beta, cu)) < TOL
    assert torch.equal(A[2], torch.eye(K).expand(H, K, K))
    assert rel_err(A @ S_in + S_zero, S_end) < TOL
    # each packed A equals the unpacked A of that sequence alone
    s = sum(lens[:3])
    sl = slice(s, s + lens[3])
    A_alone = segment_transition(k[:, sl], g[:, sl], beta[:, sl])
    assert rel_err(A[3], A_alone[0]) < TOL


def test_shard_affine_map_context_parallel():
    """Two CP shards of one packed stream: state passing through (A_shard, B_shard) gives the
    state at the end of the stream, with and without a document boundary in the second shard."""
    T, L = 90, 40  # shard 0: [0, 40), shard 1: [40, 90)
    k, g, beta = make(1, T, decay="weak", seed=6)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, T, H, K, generator=gen)
    v = torch.randn(1, T, H, V, generator=gen)

    def final(sl, cu=None, S0=None):
        _, S = naive_recurrent_gated_delta_rule(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=S0,
            output_final_state=True, cu_seqlens=cu,
        )  # fmt: skip
        return S

    sh1 = slice(L, T)
    for doc_starts in ([], [55]):  # global offsets where a new document starts inside shard 1
        cu_global = torch.tensor([0, *doc_starts, T])
        S_true = final(slice(0, T), cu_global)[-1]  # state at the end of the stream
        S_in = final(slice(0, L), torch.tensor([0, L]))  # end of shard 0
        cu1 = torch.tensor([0, *[d - L for d in doc_starts], T - L])
        A = segment_transition(k[:, sh1], g[:, sh1], beta[:, sh1], cu1)
        A_sh, B_sh = shard_affine_map(A, final(sh1, cu1), continues_previous=True)
        if doc_starts:
            assert torch.count_nonzero(A_sh) == 0
        assert rel_err(A_sh @ S_in[0] + B_sh, S_true) < TOL
    # a document starting exactly at the shard start: S_in is not used at all
    A_sh, _ = shard_affine_map(A[:1], final(sh1)[:1], continues_previous=False)
    assert torch.count_nonzero(A_sh) == 0


def test_bad_input():
    k, g, beta = make(2, 5)
    with pytest.raises(ValueError, match="B must be 1"):
        segment_transition(k, g, beta, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="offsets"):
        segment_transition(k[:1], g[:1], beta[:1], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="g must be"):
        segment_transition(k, g[:, :4], beta)
