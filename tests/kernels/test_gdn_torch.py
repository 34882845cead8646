"""Chunked PyTorch Gated DeltaNet vs the float64 token-by-token reference (CPU)."""

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

from kernels.gdn import chunk_gated_delta_rule, l2norm, naive_recurrent_gated_delta_rule
from kernels.gdn.chunk_torch import chunk_gated_delta_rule_torch

B, H, K, V = 2, 3, 16, 24  # K != V on purpose
TOL = 1e-5  # relative L2 error, fp32 chunked vs float64 reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``; the absolute error ``||a||`` where the reference is exactly zero
    (e.g. dg for T=1 from a zero state, where the chunked form leaves rounding residue)."""
    a, b = a.double(), b.double()
    ref_norm = b.norm()
    if ref_norm == 0:
        return a.norm().item()
    return ((a - b).norm() / ref_norm).item()


def make_g(shape: tuple[int, ...], regime: str, gen: torch.Generator) -> torch.Tensor:
    """Log decays ``g = -exp(A_log) * softplus(x + dt_bias)`` (Mamba2 / GDN style), per head."""
    n_heads = shape[-1]
    x = torch.randn(shape, generator=gen)
    if regime == "realistic":  # A in [1, 16], dt in [1e-3, 1e-1]: g roughly in [-3, 0)
        A_log = torch.empty(n_heads).uniform_(0.0, math.log(16.0), generator=gen)
        dt = torch.empty(n_heads).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp()
        dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        return -A_log.exp() * F.softplus(0.5 * x + dt_bias)
    if regime == "strong":  # g roughly in [-60, -1]: state forgotten within a few tokens
        A_log = torch.empty(n_heads).uniform_(math.log(4.0), math.log(16.0), generator=gen)
        return -A_log.exp() * F.softplus(x + 1.0)
    if regime == "weak":  # almost no decay: long memory across many chunks
        return -1e-3 * F.softplus(x)
    raise ValueError(regime)


def make_inputs(
    T: int,
    *,
    batch: int = B,
    n_seqs: int | None = None,
    l2norm_in_kernel: bool = False,
    with_h0: bool = False,
    decay: str = "realistic",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, T, H, K, generator=gen)
    k = torch.randn(batch, T, H, K, generator=gen)
    if not l2norm_in_kernel:
        # with beta up to 2 the recurrence is only stable for unit keys
        k = F.normalize(k, dim=-1)
    v = torch.randn(batch, T, H, V, generator=gen)
    beta = 2 * torch.sigmoid(torch.randn(batch, T, H, generator=gen))  # beta in (0, 2)
    g = make_g((batch, T, H), decay, gen)
    inputs = dict(q=q, k=k, v=v, g=g, beta=beta)
    if with_h0:
        inputs["initial_state"] = torch.randn(n_seqs or batch, H, K, V, generator=gen)
    return inputs


def run_with_grads(fn, inputs: dict[str, torch.Tensor], dtype: torch.dtype, seed: int = 1, **kw):
    """Forward + backward of ``<o, do> + <S, dS>``; returns (o, final_state, {name: grad})."""
    leaves = {n: x.detach().to(dtype).requires_grad_(True) for n, x in inputs.items()}
    o, state = fn(**leaves, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    ds = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)
    loss = (o * do).sum() + (state * ds).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), state.detach(), dict(zip(leaves, grads))


def assert_matches_reference(inputs: dict[str, torch.Tensor], **kw) -> dict[str, float]:
    o_ref, s_ref, g_ref = run_with_grads(
        naive_recurrent_gated_delta_rule, inputs, torch.float64, **kw
    )
    o, s, g = run_with_grads(chunk_gated_delta_rule_torch, inputs, torch.float32, **kw)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert o.shape == o_ref.shape and s.shape == s_ref.shape
    errs = {"o": rel_err(o, o_ref), "state": rel_err(s, s_ref)}
    errs.update({f"d{n}": rel_err(g[n], g_ref[n]) for n in inputs})
    bad = {n: e for n, e in errs.items() if not e < TOL}
    assert not bad, f"relative errors above {TOL}: {bad} (all: {errs})"
    return errs


# ---- chunked vs reference ---------------------------------------------------------------


@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h0", "h0"])
@pytest.mark.parametrize("l2", [False, True], ids=["prenorm_k", "l2norm_in_kernel"])
@pytest.mark.parametrize("T", [1, 63, 64, 75, 128, 130], ids=lambda t: f"T{t}")
def test_matches_reference(T, l2, with_h0):
    inputs = make_inputs(T, l2norm_in_kernel=l2, with_h0=with_h0, seed=T)
    assert_matches_reference(inputs, use_qk_l2norm_in_kernel=l2)


@pytest.mark.parametrize("decay", ["realistic", "strong", "weak"])
def test_decay_regimes(decay):
    inputs = make_inputs(130, with_h0=True, decay=decay, seed=7)
    assert_matches_reference(inputs)


@pytest.mark.parametrize("scale", [0.1, 1.0], ids=["scale0.1", "scale1"])
def test_scale(scale):
    inputs = make_inputs(75, l2norm_in_kernel=True, with_h0=True, seed=3)
    assert_matches_reference(inputs, scale=scale, use_qk_l2norm_in_kernel=True)
    # scale is linear in o and leaves the state alone
    o1, s1 = chunk_gated_delta_rule_torch(**inputs, scale=scale, output_final_state=True)
    o2, s2 = chunk_gated_delta_rule_torch(**inputs, scale=1.0, output_final_state=True)
    assert rel_err(o1, scale * o2) < TOL and rel_err(s1, s2) < TOL


def test_default_scale_is_inverse_sqrt_k():
    inputs = make_inputs(20, seed=4)
    o1, _ = chunk_gated_delta_rule_torch(**inputs)
    o2, _ = chunk_gated_delta_rule_torch(**inputs, scale=K**-0.5)
    assert torch.equal(o1, o2)


@pytest.mark.parametrize("chunk_size", [16, 32])
def test_other_chunk_sizes(chunk_size):
    inputs = make_inputs(75, with_h0=True, seed=5)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(**inputs, output_final_state=True)
    o, s = chunk_gated_delta_rule_torch(**inputs, output_final_state=True, chunk_size=chunk_size)
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL


# ---- packed sequences (cu_seqlens) ------------------------------------------------------

PACKED = {
    "mixed": [1, 17, 64, 5],
    "single": [130],
    "aligned": [64, 64],
    "with_empty": [3, 0, 70],
}


@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h0", "h0"])
@pytest.mark.parametrize("lens", list(PACKED.values()), ids=list(PACKED))
def test_packed_matches_reference(lens, with_h0):
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    inputs = make_inputs(
        sum(lens), batch=1, n_seqs=len(lens), l2norm_in_kernel=True, with_h0=with_h0, seed=11
    )
    assert_matches_reference(inputs, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)


def test_packed_equals_separate_sequences():
    lens = [1, 17, 64, 5]
    offsets = [0] + torch.tensor(lens).cumsum(0).tolist()
    inputs = make_inputs(sum(lens), batch=1, n_seqs=len(lens), with_h0=True, seed=13)
    cu = torch.tensor(offsets, dtype=torch.int64)
    o, s = chunk_gated_delta_rule_torch(**inputs, cu_seqlens=cu, output_final_state=True)
    assert s.shape == (len(lens), H, K, V)
    for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        one = {name: x[:, a:b] for name, x in inputs.items() if name != "initial_state"}
        o_n, s_n = chunk_gated_delta_rule_torch(
            **one, initial_state=inputs["initial_state"][n : n + 1], output_final_state=True
        )
        assert rel_err(o[:, a:b], o_n) < 1e-6
        assert rel_err(s[n : n + 1], s_n) < 1e-6


# ---- dtypes, l2norm ---------------------------------------------------------------------


def test_low_precision_inputs_return_q_dtype():
    inputs = {n: x.bfloat16() for n, x in make_inputs(40, with_h0=True, seed=17).items()}
    inputs["initial_state"] = inputs["initial_state"].float()
    o, s = chunk_gated_delta_rule_torch(**inputs, output_final_state=True)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(**inputs, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert o_ref.dtype == torch.bfloat16 and s_ref.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-2 and rel_err(s, s_ref) < 1e-5


def test_l2norm_eps_inside_rsqrt():
    x = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(l2norm(x), x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6))
    assert torch.equal(l2norm(torch.zeros(3, 4)), torch.zeros(3, 4))


# ---- api --------------------------------------------------------------------------------


def test_api_dispatch():
    cu = torch.tensor([0, 10, 30])
    inputs = make_inputs(30, batch=1, n_seqs=2, with_h0=True, seed=19)
    kw = dict(output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    o_t, s_t = chunk_gated_delta_rule_torch(**inputs, **kw)
    o_n, s_n = naive_recurrent_gated_delta_rule(**inputs, **kw)
    for backend in ("auto", "torch"):
        o, s = chunk_gated_delta_rule(**inputs, **kw, backend=backend)
        assert torch.equal(o, o_t) and torch.equal(s, s_t)
    o, s = chunk_gated_delta_rule(**inputs, **kw, backend="naive")
    assert torch.equal(o, o_n) and torch.equal(s, s_n)
    o, s = chunk_gated_delta_rule(**inputs, cu_seqlens=cu)  # no final state requested
    assert s is None and o.shape == (1, 30, H, V)


def test_api_backend_errors():
    inputs = make_inputs(8, seed=23)
    with pytest.raises(ValueError, match="valid backends"):
        chunk_gated_delta_rule(**inputs, backend="cuda")
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        chunk_gated_delta_rule(**inputs, backend="triton")
    with pytest.raises(RuntimeError, match="#640"):
        chunk_gated_delta_rule(**inputs, backend="fla")  # CPU tensors


def _bad(name: str, value):
    good = make_inputs(8, with_h0=True, seed=29)
    good[name] = value
    return good


BAD_INPUTS = {
    "q_3d": lambda: _bad("q", torch.randn(B, 8, H * K)),
    "k_shape": lambda: _bad("k", torch.randn(B, 8, H, K + 1)),
    "v_time": lambda: _bad("v", torch.randn(B, 9, H, V)),
    "v_heads": lambda: _bad("v", torch.randn(B, 8, H + 1, V)),
    "g_shape": lambda: _bad("g", torch.zeros(B, 8, H, 1)),
    "beta_batch": lambda: _bad("beta", torch.ones(B + 1, 8, H)),
    "h0_batch": lambda: _bad("initial_state", torch.zeros(B + 1, H, K, V)),
    "h0_kv_swapped": lambda: _bad("initial_state", torch.zeros(B, H, V, K)),
}


@pytest.mark.parametrize("make", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_api_rejects_bad_shapes(make):
    with pytest.raises(ValueError):
        chunk_gated_delta_rule(**make())


def test_api_rejects_bad_cu_seqlens():
    inputs = make_inputs(8, seed=31)  # B == 2
    with pytest.raises(ValueError, match="B must be 1"):
        chunk_gated_delta_rule(**inputs, cu_seqlens=torch.tensor([0, 8]))
    packed = make_inputs(8, batch=1, seed=31)
    with pytest.raises(ValueError, match="offsets"):
        chunk_gated_delta_rule(**packed, cu_seqlens=torch.tensor([0, 5]))  # does not end at T
    with pytest.raises(ValueError, match="initial_state"):
        h0 = torch.zeros(1, H, K, V)  # two sequences need two states
        chunk_gated_delta_rule(**packed, cu_seqlens=torch.tensor([0, 3, 8]), initial_state=h0)
