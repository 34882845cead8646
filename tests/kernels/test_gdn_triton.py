"""Our Triton GDN kernels (chunked forward + backward, decode step) vs the float64 reference.

Runs on CPU through Triton's interpreter: the kernels run interpreted for CPU tensors whatever
TRITON_INTERPRET was at import (see ``triton_chunk._module_in_mode``); the fixture below sets
TRITON_INTERPRET=1 per test only for the api's ``backend="auto"`` dispatch, and leaves it unset
for other test modules in the same process. Sizes are tiny: the interpreter is slow.
"""

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

pytest.importorskip("triton")

from kernels.gdn import chunk_gated_delta_rule, naive_recurrent_gated_delta_rule  # noqa: E402
from kernels.gdn.triton_chunk import chunk_gated_delta_rule_triton  # noqa: E402
from kernels.gdn.triton_step import fused_recurrent_gated_delta_rule_step  # noqa: E402

TOL = 2e-3  # relative L2 error bound, fp32 kernels vs float64 reference (observed ~1e-6)
H = 2


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (``||a||`` where the reference is exactly zero)."""
    a, b = a.double(), b.double()
    ref = b.norm()
    return a.norm().item() if ref == 0 else ((a - b).norm() / ref).item()


def make_inputs(T, K, V, *, batch=2, n_seqs=None, l2=False, h0=False, decay="realistic", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, T, H, K, generator=gen)
    k = torch.randn(batch, T, H, K, generator=gen)
    if not l2:
        k = F.normalize(k, dim=-1)  # beta up to 2 is only stable for unit keys
    v = torch.randn(batch, T, H, V, generator=gen)
    beta = 2 * torch.sigmoid(torch.randn(batch, T, H, generator=gen))  # beta in (0, 2)
    x = torch.randn(batch, T, H, generator=gen)
    if decay == "realistic":  # g in roughly [-3, 0)
        A = torch.empty(H).uniform_(1.0, 16.0, generator=gen)
        dt = torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp()
        g = -A * F.softplus(0.5 * x + torch.log(torch.expm1(dt)))
    elif decay == "strong":  # g down to ~ -60: the state forgets within a few tokens
        g = -torch.empty(H).uniform_(4.0, 16.0, generator=gen) * F.softplus(x + 1.0)
    else:  # "weak": long memory across chunks
        g = -1e-3 * F.softplus(x)
    inputs = dict(q=q, k=k, v=v, g=g, beta=beta)
    if h0:
        inputs["initial_state"] = torch.randn(n_seqs or batch, H, K, V, generator=gen)
    return inputs


def run_with_grads(fn, inputs, dtype, seed=1, **kw):
    """Forward + backward of ``<o, do> + <S, dS>``; returns (o, final_state, {name: grad})."""
    leaves = {n: x.detach().to(dtype).requires_grad_(True) for n, x in inputs.items()}
    o, state = fn(**leaves, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    ds = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)
    loss = (o * do).sum() + (state * ds).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), state.detach(), dict(zip(leaves, grads))


def assert_matches_reference(inputs, **kw):
    o_ref, s_ref, g_ref = run_with_grads(
        naive_recurrent_gated_delta_rule, inputs, torch.float64, **kw
    )
    o, s, g = run_with_grads(chunk_gated_delta_rule_triton, inputs, torch.float32, **kw)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert o.shape == o_ref.shape and s.shape == s_ref.shape
    errs = {"o": rel_err(o, o_ref), "state": rel_err(s, s_ref)}
    errs.update({f"d{n}": rel_err(g[n], g_ref[n]) for n in inputs})
    bad = {n: e for n, e in errs.items() if not e < TOL}
    assert not bad, f"relative errors above {TOL}: {bad} (all: {errs})"
    return errs


# ---- chunked forward + backward vs the float64 reference ----------------------------------

CASES = [  # (T, K, V, initial state, in-kernel l2norm)
    (1, 16, 32, True, True),
    (37, 16, 32, False, False),
    (64, 16, 32, True, False),
    (130, 16, 32, False, True),
    (1, 32, 16, False, False),
    (37, 32, 16, True, True),
    (64, 32, 16, False, True),
    (130, 32, 16, True, False),
    (37, 24, 24, True, False),
    (130, 24, 24, True, True),
]


@pytest.mark.parametrize(
    "T,K,V,h0,l2", CASES, ids=[f"T{c[0]}-K{c[1]}V{c[2]}-h0{int(c[3])}-l2{int(c[4])}" for c in CASES]
)
def test_matches_reference(T, K, V, h0, l2):
    inputs = make_inputs(T, K, V, l2=l2, h0=h0, seed=T + K)
    assert_matches_reference(inputs, use_qk_l2norm_in_kernel=l2)


@pytest.mark.parametrize("decay", ["strong", "weak"])
def test_decay_regimes(decay):
    inputs = make_inputs(100, 16, 32, h0=True, decay=decay, seed=7)
    assert_matches_reference(inputs)


PACKED = {
    "mixed": [1, 17, 64, 5],
    "with_empty": [3, 0, 70],
    "trailing_empty": [70, 0],
    "two_chunks": [128],
}


@pytest.mark.parametrize("lens", list(PACKED.values()), ids=list(PACKED))
def test_packed_matches_reference(lens):
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    inputs = make_inputs(sum(lens), 16, 32, batch=1, n_seqs=len(lens), l2=True, h0=True, seed=11)
    assert_matches_reference(inputs, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)


# kernel variants selected by GDN_TRITON_CFG (the defaults are the fastest on the H200): the split
# reverse pass (default) at narrow V slices, and by Q (chain_q=1); the two-product reverse pass
# (split_bwd=0); the forward state pass with / without its register prefetch; the bwd chunk
# kernel split in three (split_bchunk, the default where K is not a multiple of the K block) and
# the fused one; Tinv saved in the buffer dtype with the diagonals on k and v (tinv_f32=0); the
# forward's W, u and states kept for the backward (save_fwd), without and with Q
VARIANTS = [
    "split_bwd=1,pf_fstate=0,bv_fstate=32",
    "split_bwd=1,bv_bstate=16,bv_rhs=16",
    "split_bwd=1,chain_q=1",
    "split_bwd=0,pf_fstate=0,bv_fstate=16,bv_bstate=32",
    "split_bwd=0,pf_fstate=1",
    "split_bchunk=1",
    "split_bchunk=1,split_bwd=0,BK=16,BV=16,bk_bkb=0",
    "split_bchunk=0",
    "tinv_f32=0",
    "save_fwd=1",
    "save_fwd=1,chain_q=1",
]


@pytest.mark.parametrize("cfg", VARIANTS)
def test_kernel_variants_match_reference(cfg, monkeypatch):
    monkeypatch.setenv("GDN_TRITON_CFG", cfg)
    lens = [1, 17, 130, 0, 64]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    inputs = make_inputs(sum(lens), 24, 40, batch=1, n_seqs=len(lens), l2=True, h0=True, seed=29)
    assert_matches_reference(inputs, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("chain_q", [1, 0])
def test_saved_forward_gives_bitwise_the_recomputed_gradients(chain_q, monkeypatch):
    """save_fwd keeps the forward's W, u and states instead of recomputing them: the same kernels
    on the same inputs, so every output and gradient must be bitwise equal (bf16, where a
    recompute that differed in any rounding would show)."""
    lens = [1, 70, 0, 64]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    inputs = make_inputs(sum(lens), 24, 40, batch=1, n_seqs=len(lens), l2=True, h0=True, seed=5)
    kw = dict(cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    runs = []
    for save in (0, 1):
        monkeypatch.setenv("GDN_TRITON_CFG", f"save_fwd={save},chain_q={chain_q}")
        runs.append(run_with_grads(chunk_gated_delta_rule_triton, inputs, torch.bfloat16, **kw))
    # the API's save_intermediates=True (what the model's gdn_save_intermediates sets) is the
    # same switch
    monkeypatch.setenv("GDN_TRITON_CFG", f"chain_q={chain_q}")
    kw.update(save_intermediates=True, backend="triton")
    runs.append(run_with_grads(chunk_gated_delta_rule, inputs, torch.bfloat16, **kw))
    (o0, s0, g0), *others = runs
    # and it really keeps them: the autograd node holds W, u and the states, 3 tensors more
    leaves = {n: x.detach().to(torch.bfloat16).requires_grad_(True) for n, x in inputs.items()}
    held = []
    for save in (False, True):
        o, _ = chunk_gated_delta_rule(**leaves, **{**kw, "save_intermediates": save})
        held.append(len(_autograd_node(o, "_ChunkGatedDeltaRuleBackward").saved_tensors))
    assert held[1] == held[0] + 3, held
    for o1, s1, g1 in others:
        assert torch.equal(o0, o1) and torch.equal(s0, s1)
        for n in g0:
            assert torch.equal(g0[n], g1[n]), n


def _autograd_node(t: torch.Tensor, name: str):
    """The first node called ``name`` in t's autograd graph (breadth first)."""
    todo, seen = [t.grad_fn], set()
    while todo:
        node = todo.pop(0)
        if node is None or node in seen:
            continue
        if type(node).__name__ == name:
            return node
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    raise AssertionError(f"no {name} in the autograd graph")


# K > 128: the default (split kernels without Q, which compile without spills there,
# tools/kernel_resources.py) and the two-product reverse pass with [K, 16] state slices
K_ABOVE_128 = ["", "split_bwd=0,bv_bstate=16,split_bchunk=0"]


@pytest.mark.parametrize("cfg", K_ABOVE_128, ids=["default", "two_product"])
def test_head_dim_above_128(cfg, monkeypatch):
    monkeypatch.setenv("GDN_TRITON_CFG", cfg)
    lens = [70, 9]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    inputs = make_inputs(sum(lens), 136, 24, batch=1, n_seqs=2, l2=True, h0=True, seed=31)
    assert_matches_reference(inputs, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)


def test_packed_without_initial_state():
    lens = [1, 17, 64, 5]
    cu = torch.tensor([0] + lens).cumsum(0)
    inputs = make_inputs(sum(lens), 24, 24, batch=1, seed=12)
    assert_matches_reference(inputs, cu_seqlens=cu, scale=0.3)


def test_gradient_through_output_or_state_only():
    inputs = make_inputs(70, 16, 32, h0=True, seed=13)
    leaves = {n: x.clone().requires_grad_(True) for n, x in inputs.items()}
    ref = {n: x.double().requires_grad_(True) for n, x in inputs.items()}
    o, s = chunk_gated_delta_rule_triton(**leaves, output_final_state=True)
    o_r, s_r = naive_recurrent_gated_delta_rule(**ref, output_final_state=True)
    for out, out_r in ((o, o_r), (s, s_r)):  # each output alone: the other grad is None
        kw = dict(retain_graph=True, allow_unused=True)  # q does not reach the final state
        grads = torch.autograd.grad(out.square().sum(), list(leaves.values()), **kw)
        grads_r = torch.autograd.grad(out_r.square().sum(), list(ref.values()), **kw)
        for name, a, b in zip(leaves, grads, grads_r):
            b = torch.zeros_like(leaves[name]) if b is None else b
            assert rel_err(a, b) < TOL, name


# ---- dtypes, determinism, api ----------------------------------------------------------------


def test_bf16_inputs():
    """bf16 path (16-bit matmul operands and buffers; emulated in the interpreter)."""
    inputs = make_inputs(70, 32, 16, h0=True, seed=17)
    low = {n: (x if n == "initial_state" else x.bfloat16()) for n, x in inputs.items()}
    o, s = chunk_gated_delta_rule_triton(**low, output_final_state=True)
    rounded = {n: x.float() for n, x in low.items()}
    o_ref, s_ref = naive_recurrent_gated_delta_rule(**rounded, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(o, o_ref) < 3e-2 and rel_err(s, s_ref) < 3e-2
    leaves = {n: x.requires_grad_(True) for n, x in low.items()}
    o, s = chunk_gated_delta_rule_triton(**leaves, output_final_state=True)
    grads = torch.autograd.grad(o.float().sum() + s.sum(), list(leaves.values()))  # bf16 bwd
    for name, grad in zip(leaves, grads):
        assert grad.dtype == leaves[name].dtype and torch.isfinite(grad).all(), name


def test_bf16_inputs_l2norm_in_kernel():
    """bf16 with the fused L2 norm: normalised q, k are bf16 (what the kernels read), their
    gradients come back in bf16 through the float32 norm backward."""
    inputs = make_inputs(70, 24, 16, l2=True, h0=True, seed=31)
    low = {n: (x if n in ("initial_state", "g") else x.bfloat16()) for n, x in inputs.items()}
    leaves = {n: x.clone().requires_grad_(True) for n, x in low.items()}
    o, s = chunk_gated_delta_rule_triton(**leaves, output_final_state=True,
                                         use_qk_l2norm_in_kernel=True)  # fmt: skip
    ref_in = {n: x.double().requires_grad_(True) for n, x in low.items()}
    o_r, s_r = naive_recurrent_gated_delta_rule(**ref_in, output_final_state=True,
                                                use_qk_l2norm_in_kernel=True)  # fmt: skip
    assert o.dtype == torch.bfloat16 and rel_err(o, o_r) < 3e-2 and rel_err(s, s_r) < 3e-2
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((o.double() * do).sum() + s.sum(), list(leaves.values()))
    grads_r = torch.autograd.grad((o_r * do).sum() + s_r.sum(), list(ref_in.values()))
    for name, grad, grad_r in zip(leaves, grads, grads_r):
        assert grad.dtype == leaves[name].dtype, name
        assert rel_err(grad, grad_r) < 5e-2, name


def test_deterministic():
    lens = [1, 17, 64, 50]
    cu = torch.tensor([0] + lens).cumsum(0)
    inputs = make_inputs(sum(lens), 16, 32, batch=1, n_seqs=len(lens), l2=True, h0=True, seed=19)
    kw = dict(cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    o1, s1, g1 = run_with_grads(chunk_gated_delta_rule_triton, inputs, torch.float32, **kw)
    o2, s2, g2 = run_with_grads(chunk_gated_delta_rule_triton, inputs, torch.float32, **kw)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_api_dispatch(monkeypatch):
    inputs = make_inputs(40, 16, 32, h0=True, seed=23)
    o_t, s_t = chunk_gated_delta_rule_triton(**inputs, output_final_state=True)
    for backend in ("auto", "triton"):  # TRITON_INTERPRET=1 (fixture): ours on CPU
        o, s = chunk_gated_delta_rule(**inputs, output_final_state=True, backend=backend)
        assert torch.equal(o, o_t) and torch.equal(s, s_t)
    o_c, _ = chunk_gated_delta_rule(**inputs, backend="torch")
    monkeypatch.delenv("TRITON_INTERPRET")
    o, _ = chunk_gated_delta_rule(**inputs, backend="auto")  # plain CPU: chunked torch
    assert torch.equal(o, o_c)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        chunk_gated_delta_rule(**inputs, backend="triton")


def test_triton_refused_at_small_k_16bit_on_cuda():
    """The dispatch guard (api._triton_refusal): our compiled kernels are refused at K <= 32 with
    16-bit inputs on CUDA (Hopper faults, docs/kernels.md); float32, K > 32 and the interpreter
    are not affected."""
    from kernels.gdn.api import _triton_refusal

    for K in (16, 24, 32):
        for dtype in (torch.bfloat16, torch.float16):
            assert _triton_refusal(K, dtype, on_cuda=True), (K, dtype)
    assert "key head dim 16 < 32" in _triton_refusal(16, torch.bfloat16, True)
    assert "key head dim 32 <= 32" in _triton_refusal(32, torch.bfloat16, True)
    for K, dtype, on_cuda in [(33, torch.bfloat16, True), (64, torch.float16, True),
                              (16, torch.float32, True), (32, torch.bfloat16, False)]:  # fmt: skip
        assert _triton_refusal(K, dtype, on_cuda) is None, (K, dtype, on_cuda)
    # on CPU (interpreter) 'triton' still runs ours at K = 32 in bf16
    inputs = make_inputs(9, 32, 16, seed=3)
    low = {n: x.bfloat16() for n, x in inputs.items()}
    o, _ = chunk_gated_delta_rule(**low, backend="triton")
    o_t, _ = chunk_gated_delta_rule_triton(**low)
    assert torch.equal(o, o_t)


def test_rejects_unsupported_head_dims():
    inputs = make_inputs(8, 8, 32, seed=29)
    with pytest.raises(ValueError, match="16 <= K, V <= 256"):
        chunk_gated_delta_rule_triton(**inputs)
    o, _ = chunk_gated_delta_rule(**inputs, backend="auto")  # auto falls back to torch
    assert o.shape == (2, 8, H, 32)


# ---- decode step ----------------------------------------------------------------------------


@pytest.mark.parametrize("l2", [False, True], ids=["prenorm_k", "l2norm_in_kernel"])
@pytest.mark.parametrize("K,V", [(16, 32), (24, 40)], ids=["K16V32", "K24V40"])
def test_step_matches_reference(K, V, l2):
    inputs = make_inputs(1, K, V, l2=l2, h0=True, seed=K + V)
    state = inputs.pop("initial_state")
    o, new_state = fused_recurrent_gated_delta_rule_step(
        **inputs, state=state, use_qk_l2norm_in_kernel=l2
    )
    o_ref, s_ref = naive_recurrent_gated_delta_rule(
        **inputs, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=l2
    )
    assert o.shape == (2, 1, H, V) and new_state.shape == (2, H, K, V)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(new_state, s_ref) < 1e-5
    # [B, H, *] inputs, in place
    squeezed = {n: x[:, 0] for n, x in inputs.items()}
    inplace = state.clone()
    o3, s3 = fused_recurrent_gated_delta_rule_step(
        **squeezed, state=inplace, use_qk_l2norm_in_kernel=l2, inplace=True
    )
    assert s3 is inplace and torch.equal(s3, new_state) and torch.equal(o3, o[:, 0])


def test_step_chain_matches_chunked():
    """Decoding token by token from a prefill's final state continues the chunked recurrence."""
    inputs = make_inputs(70, 16, 32, h0=True, seed=31)
    T_pre = 64
    pre = {n: (x if n == "initial_state" else x[:, :T_pre]) for n, x in inputs.items()}
    _, state = chunk_gated_delta_rule_triton(**pre, output_final_state=True)
    outs = []
    for t in range(T_pre, 70):
        tok = {n: x[:, t : t + 1] for n, x in inputs.items() if n != "initial_state"}
        o, state = fused_recurrent_gated_delta_rule_step(**tok, state=state)
        outs.append(o)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(**inputs, output_final_state=True)
    assert rel_err(torch.cat(outs, dim=1), o_ref[:, T_pre:]) < 1e-5
    assert rel_err(state, s_ref) < 1e-5
