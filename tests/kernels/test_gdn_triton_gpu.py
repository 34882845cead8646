"""Our Triton GDN kernels on a CUDA GPU: Olmo-sized heads, long sequences, packs, bf16 / fp32.

Every run first poisons the CUDA caching allocator with NaNs (its freed blocks back the kernels'
``torch.empty`` outputs and buffers), so unwritten output elements show up as NaN. References:
float64 token-by-token (forward, T <= 1000) and chunked PyTorch (gradients; forward at T >= 8192,
where the float64 loop is too slow; it computes in float32 whatever its input dtype).
Run: ``pytest -m gpu tests/kernels/test_gdn_triton_gpu.py -s`` (``-s`` prints the errors).
"""

import sys
from pathlib import Path

try:
    import kernels  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import os

import pytest
import torch
import torch.nn.functional as F

from kernels.gdn import naive_recurrent_gated_delta_rule
from kernels.gdn.chunk_torch import chunk_gated_delta_rule_torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HEADS = {"olmo_30h_k96_v192": (30, 96, 192), "32h_k128_v128": (32, 128, 128)}
TOL_FP32 = 2e-3
TOL_BF16 = {"o": 3e-2, "state": 3e-2, "grad": 8e-2}  # vs the float32 reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    ref = b.norm()
    return a.norm().item() if ref == 0 else ((a - b).norm() / ref).item()


def poison_allocator(n_bytes: int = 6 << 30) -> None:
    """Fill free cached CUDA memory with NaN, so outputs the kernels forget to write are NaN."""
    torch.cuda.synchronize()
    junk = torch.empty(n_bytes // 4, device="cuda", dtype=torch.float32)
    junk.fill_(float("nan"))
    del junk


def make_inputs(B, T, H, K, V, n_seqs=None, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    beta = 2 * torch.sigmoid(randn(B, T, H))  # beta in (0, 2)
    A = torch.linspace(1.0, 16.0, H, device="cuda")
    g = -A * F.softplus(0.5 * randn(B, T, H) - 4.0)  # g in roughly [-3, 0)
    h0 = randn(n_seqs or B, H, K, V)
    return dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0)


def run(fn, inputs, dtype, cu_seqlens=None, seed=1):
    """fwd + bwd of ``<o, do> + <S, dS>`` with in-kernel l2norm; returns (o, S, grads)."""
    leaves = {
        n: (x if n in ("g", "initial_state") else x.to(dtype)).detach().requires_grad_(True)
        for n, x in inputs.items()
    }
    o, s = fn(
        **leaves, output_final_state=True, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True
    )
    gen = torch.Generator(device="cuda").manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, device="cuda").to(o.dtype)
    ds = torch.randn(s.shape, generator=gen, device="cuda")
    grads = torch.autograd.grad(
        (o.float() * do.float()).sum() + (s * ds).sum(), list(leaves.values())
    )
    return o.detach(), s.detach(), dict(zip(leaves, grads))


def ours(**kw):
    from kernels.gdn.triton_chunk import chunk_gated_delta_rule_triton

    return chunk_gated_delta_rule_triton(**kw)


CASES = {  # name: (B, T, cu_seqlens lengths or None)
    "T64": (2, 64, None),
    "T1000": (2, 1000, None),
    "T8192": (1, 8192, None),
    "T32768": (1, 32768, None),
    "packed": (1, None, [1, 100, 0, 64, 2000, 37, 4000, 63, 0]),  # incl. empty sequences
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", list(HEADS.values()), ids=list(HEADS))
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_gpu_matches_reference_and_is_deterministic(case, heads, dtype):
    check_against_references(case, heads, dtype)


# K > 128: the default (split kernels without Q, 32-wide reverse slices, float32 forward state
# products; see _config) and the two-product reverse pass with [K, 16] slices (float32 products:
# its bf16 ones fault on the H200 with Triton 3.6)
K_ABOVE_128 = ["", "split_bwd=0,bv_bstate=16,split_bchunk=0"]


@pytest.mark.parametrize("cfg", K_ABOVE_128, ids=["default", "two_product"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_head_dim_above_128(dtype, cfg, monkeypatch):
    monkeypatch.setenv("GDN_TRITON_CFG", cfg)
    check_against_references((1, None, [100, 0, 250]), (4, 192, 256), dtype)


# non-default kernel settings (GDN_TRITON_CFG), bf16 at the Olmo head shape
VARIANTS = [
    "split_bchunk=0",  # the fused bwd chunk kernel (the default at K = 128)
    "pipe_bstate=0",  # the chain's while loop with register prefetch (what the interpreter runs)
    "split_bwd=0",
    "chain_q=1",  # the chain by Q (the default until 2026-12-03)
    "chain_q=1,pipe_bstate=0",
    "pipe_fstate=2",
    "tinv_f32=0",  # Tinv in bf16, beta (Gam) on v (k)
    "save_fwd=1",  # the forward's W, u, states kept for the backward
    "save_fwd=1,chain_q=1",
]


@pytest.mark.parametrize("cfg", VARIANTS)
def test_gpu_kernel_variants(cfg, monkeypatch):
    monkeypatch.setenv("GDN_TRITON_CFG", cfg)
    check_against_references(CASES["T1000"], HEADS["olmo_30h_k96_v192"], torch.bfloat16)


def check_against_references(case, heads, dtype):
    B, T, lens = case
    H, K, V = heads
    cu = None
    if lens is not None:
        T = sum(lens)
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    inputs = make_inputs(B, T, H, K, V, n_seqs=None if lens is None else len(lens), seed=T)

    poison_allocator()
    o1, s1, g1 = run(ours, inputs, dtype, cu)
    poison_allocator()
    o2, s2, g2 = run(ours, inputs, dtype, cu)
    for name, x in [("o", o1), ("state", s1), *g1.items()]:
        assert not torch.isnan(x).any(), f"NaN in {name}"
    assert torch.equal(o1, o2) and torch.equal(s1, s2), "forward not deterministic"
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"d{name} not deterministic"

    # references in float32 inputs (bf16 runs are compared with the float32 maths)
    o_c, s_c, g_c = run(chunk_gated_delta_rule_torch, inputs, torch.float32, cu)
    if T <= 1000:
        with torch.no_grad():
            ref_in = {n: x.double() for n, x in inputs.items()}
            o_r, s_r = naive_recurrent_gated_delta_rule(
                **ref_in, output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True
            )
    else:
        o_r, s_r = o_c, s_c
    errs = {"o": rel_err(o1, o_r), "state": rel_err(s1, s_r)}
    errs.update({f"d{n}": rel_err(g1[n], g_c[n]) for n in g1})
    print(f"\n[{dtype}, H={H} K={K} V={V}, B={B} T={T}, packed={lens is not None}] rel errors:")
    print("  " + ", ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    if dtype == torch.float32:
        bad = {n: e for n, e in errs.items() if not e < TOL_FP32}
    else:
        bad = {
            n: e
            for n, e in errs.items()
            if not e < TOL_BF16.get(n, TOL_BF16["grad"] if n.startswith("d") else 0)
        }
    assert not bad, f"relative errors too large: {bad}"


def test_gpu_api_auto_uses_triton():
    from kernels.gdn import chunk_gated_delta_rule
    from kernels.gdn.triton_chunk import chunk_gated_delta_rule_triton

    inputs = make_inputs(1, 200, 4, 64, 64, seed=3)
    inputs = {n: (x if n in ("g", "initial_state") else x.bfloat16()) for n, x in inputs.items()}
    kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)  # (raw keys would diverge)
    o_a, s_a = chunk_gated_delta_rule(**inputs, **kw)
    o_t, s_t = chunk_gated_delta_rule_triton(**inputs, **kw)
    assert not torch.isnan(o_a).any()
    assert torch.equal(o_a, o_t) and torch.equal(s_a, s_t)


# ---- the 16-bit faults at K <= 32 (kernels/gdn/api.py _triton_refusal, docs/kernels.md) -------
#
# Our compiled kernels are wrong at K <= 32 with 16-bit inputs on sm_90 (Triton 3.6), so the api
# refuses them there (kernels/gdn/api.py _triton_refusal) and `auto` takes the torch path. The H100
# sitting of 2026-12-05 ran the kernels directly, each setting in its own process with
# CUDA_LAUNCH_BLOCKING=1, against the float64 recurrence (docs/kernels.md, "Known faults"):
#   K 32 / V 64: default, pipe_bstate=0 and 4 warps fault in the backward; kp_min=64 and
#                split_bchunk=1 run but dk is wrong (rel. error 5.3-5.5); o right (3.8e-3).
#   K 16 / V 32: o wrong (1.2) under every setting; kp_min=64 also faults in the backward.
# No setting fixes both, so the guard stays. The default case is a strict xfail: the day a Triton
# upgrade makes the kernels right it fails, and the guard can go. GDN_SMALL_K_SWEEP=1 runs the
# other settings too (diagnosis only; ~10 s each).

FP8_MODEL = (2, 128, 4, 32, 64)  # B, T, H, K, V of tests/gpu/test_fp8.py's model (bf16, no packing)
TINY_HEADS = (1, 256, 6, 16, 32)  # the tiny preset's heads (the K = 16 fault)
SMALL_K_CFGS = {
    "default": "",
    "kp_min64": "kp_min=64",  # the candidate fix: tiles padded to K = 64's shapes
    "pipe0": "pipe_bstate=0",  # the chain's register-prefetch loop instead of the pipelined one
    "warps4": "w_fstate=4,w_bstate=4,w_rhs=4,w_bchunk=4",  # fewer replicated warps
    "split_bchunk": "split_bchunk=1",  # the three bwd chunk kernels instead of the fused one
}

_SMALL_K_SCRIPT = """
import json, sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from kernels.gdn.naive import naive_recurrent_gated_delta_rule
from kernels.gdn.triton_chunk import chunk_gated_delta_rule_triton
B, T, H, K, V = {shape}
gen = torch.Generator(device="cuda").manual_seed(0)
r = lambda *s: torch.randn(*s, generator=gen, device="cuda")
x = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), beta=torch.sigmoid(r(B, T, H)))
x = {{n: t.bfloat16() for n, t in x.items()}}
x["g"] = -F.softplus(0.5 * r(B, T, H) - 2.0)  # float32, as the model passes it
x = {{n: t.requires_grad_() for n, t in x.items()}}
kw = dict(scale=K ** -0.5, use_qk_l2norm_in_kernel=True)
o, _ = chunk_gated_delta_rule_triton(**x, **kw)
torch.cuda.synchronize()
print("FWD OK", flush=True)
do = r(B, T, H, V).bfloat16()
grads = torch.autograd.grad(o, list(x.values()), do)
torch.cuda.synchronize()
print("BWD OK", flush=True)
ref = {{n: t.detach().double().requires_grad_() for n, t in x.items()}}
o_r, _ = naive_recurrent_gated_delta_rule(**ref, **kw)
grads_r = torch.autograd.grad(o_r, list(ref.values()), do.double())
rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
errs = {{"o": rel(o, o_r), **{{"d" + n: rel(a, b) for n, a, b in zip(x, grads, grads_r)}}}}
print("ERRS " + json.dumps(errs), flush=True)
"""


def run_small_k_case(shape, cfg: str) -> dict:
    """One fwd + bwd in a fresh process; returns {"said": [...], "errs": {...}, "rc": rc}."""
    import json
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1", "GDN_TRITON_CFG": cfg}
    code = _SMALL_K_SCRIPT.format(root=root, shape=tuple(shape))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=root, timeout=900)  # fmt: skip
    out = p.stdout + p.stderr
    errs = {}
    for line in out.splitlines():
        if line.startswith("ERRS "):
            errs = json.loads(line[5:])
    said = [ln for ln in out.splitlines() if " OK" in ln or "Error" in ln or "error" in ln]
    return {"said": said[-4:], "errs": errs, "rc": p.returncode}


_SWEEP = os.environ.get("GDN_SMALL_K_SWEEP") == "1"


@pytest.mark.parametrize(
    "cfg",
    [pytest.param("", id="default", marks=pytest.mark.xfail(
        strict=True, reason="Triton 3.6 on sm_90: 16-bit K <= 32 is wrong or faults (guarded)"))]
    + [pytest.param(c, id=n) for n, c in SMALL_K_CFGS.items() if n != "default" and _SWEEP],
)  # fmt: skip
@pytest.mark.parametrize("shape", [FP8_MODEL, TINY_HEADS], ids=["fp8_model_k32v64", "k16v32"])
def test_gpu_small_k_bf16_kernels(shape, cfg):
    res = run_small_k_case(shape, cfg)
    print(f"\n[{shape} GDN_TRITON_CFG={cfg!r}] rc={res['rc']} {res['said']}")
    print("  " + ", ".join(f"{n}={e:.1e}" for n, e in res["errs"].items()))
    assert res["rc"] == 0 and res["errs"], f"fault: {res['said']}"
    bad = {n: e for n, e in res["errs"].items() if not e < 3e-2}
    assert not bad, f"relative errors vs the float64 recurrence too large: {bad}"


def test_gpu_api_refuses_small_k_16bit():
    """The guard: at the test_fp8 shape 'auto' takes the chunked torch path (right), 'triton'
    is refused; float32 still runs our kernels."""
    from kernels.gdn import chunk_gated_delta_rule
    from kernels.gdn.triton_chunk import chunk_gated_delta_rule_triton

    B, T, H, K, V = FP8_MODEL
    inputs = make_inputs(B, T, H, K, V, seed=7)
    low = {n: (x if n in ("g", "initial_state") else x.bfloat16()) for n, x in inputs.items()}
    kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_a, _ = chunk_gated_delta_rule(**low, **kw)
    o_c, _ = chunk_gated_delta_rule_torch(**low, **kw)
    assert torch.equal(o_a, o_c)
    with pytest.raises(ValueError, match="key head dim 32 <= 32"):
        chunk_gated_delta_rule(**low, **kw, backend="triton")
    o_a, s_a = chunk_gated_delta_rule(**inputs, **kw)  # float32: ours
    o_t, s_t = chunk_gated_delta_rule_triton(**inputs, **kw)
    assert torch.equal(o_a, o_t) and torch.equal(s_a, s_t)


def test_gpu_decode_step():
    from kernels.gdn.triton_step import fused_recurrent_gated_delta_rule_step

    H, K, V = HEADS["olmo_30h_k96_v192"]
    inputs = make_inputs(3, 1, H, K, V, seed=5)
    state = inputs.pop("initial_state")
    for dtype in (torch.float32, torch.bfloat16):
        x = {n: (v if n == "g" else v.to(dtype)) for n, v in inputs.items()}
        o, s = fused_recurrent_gated_delta_rule_step(**x, state=state, use_qk_l2norm_in_kernel=True)
        ref = {n: v.double() for n, v in x.items()}
        o_r, s_r = naive_recurrent_gated_delta_rule(
            **ref, initial_state=state.double(), output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )  # fmt: skip
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_err(o, o_r) < tol and rel_err(s, s_r) < 1e-5
