"""GPU: our Triton GDN kernels (and the conv) on fuzzed packed-document layouts — one-token
documents in runs, the EOD-only row (every token its own document), starts at and next to the
64-token chunk edges, one document over the row — against the float64 token-by-token reference.

Each layout runs forward + backward with ``CUDA_LAUNCH_BLOCKING=1`` semantics (synchronize after
every call), so a faulting kernel is named with the layout that made it fault. Runs with pytest
or as a script that ends with "GDN PACKED FUZZ GPU OK":

    PYTHONPATH=/tmp/site:$PWD python3 tests/gpu/test_gdn_packed_fuzz_gpu.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.data.batches import collate
from megatron_hybrid.kernels.gdn import chunk_gated_delta_rule, naive_recurrent_gated_delta_rule
from tests.parallel.document_fuzz import FuzzDocumentsDataset

try:
    import pytest
except ImportError:  # run as a script
    pytest = None

if pytest is not None:
    pytestmark = [
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ]

SHAPES = {"k32": (6, 32, 32), "olmo": (30, 96, 192)}
# K = 16 in bf16 is wrong on the H200 (2026-12-04: o rel. error 1.2, dk 3.5 at every layout,
# an illegal address in the trainer's tiny preset); float32 is right. Kept as a known failure.
K16 = (6, 16, 32)
TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2}


def layouts(n: int, rows: int = 24, seed: int = 5) -> list[list[int]]:
    ds = FuzzDocumentsDataset(rows, n, 512, 511, seed)
    out = [collate([ds[i]], 511, True)["cu_seqlens"].tolist() for i in range(rows)]
    out.append(list(range(n + 1)))  # every token its own document
    out.append([0, 63, 64, 65, 127, 128, n])  # one-token documents at chunk edges
    return out


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_layout(
    cu: list[int], H: int, K: int, V: int, dtype, seed: int = 0, backend: str = "triton"
) -> dict[str, float]:
    T = cu[-1]
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    q, k, v = randn(1, T, H, K), randn(1, T, H, K), randn(1, T, H, V)
    beta = 2 * torch.sigmoid(randn(1, T, H))
    g = -F.softplus(0.5 * randn(1, T, H) - 2.0)
    ins = [t.to(dtype).requires_grad_() for t in (q, k, v, g, beta)]
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    kw = dict(scale=K**-0.5, cu_seqlens=cu_t, use_qk_l2norm_in_kernel=True)
    if backend == "kernels":  # our Triton kernels whatever the api's guard refuses (K <= 32 bf16)
        from megatron_hybrid.kernels.gdn.triton_chunk import chunk_gated_delta_rule_triton

        o, _ = chunk_gated_delta_rule_triton(*ins, **kw)
    else:
        o, _ = chunk_gated_delta_rule(*ins, **kw, backend=backend)
    do = randn(*o.shape).to(dtype)
    grads = torch.autograd.grad(o, ins, do)
    torch.cuda.synchronize()
    ref_in = [t.detach().double().requires_grad_() for t in ins]
    o_ref, _ = naive_recurrent_gated_delta_rule(
        *ref_in, scale=K**-0.5, cu_seqlens=cu_t.cpu().cuda(), use_qk_l2norm_in_kernel=True
    )
    ref_grads = torch.autograd.grad(o_ref, ref_in, do.double())
    errs = {"o": rel(o, o_ref)}
    errs.update({f"d{n}": rel(a, b) for n, a, b in zip("qkvgb", grads, ref_grads)})
    return errs


def check_all(n: int = 256) -> None:
    for name, (H, K, V) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            worst = {}
            for cu in layouts(n):
                try:
                    errs = run_layout(cu, H, K, V, dtype, backend="kernels")
                except Exception as e:  # noqa: BLE001 - name the layout that faulted
                    raise AssertionError(f"{name} {dtype} cu_seqlens={cu}: {e}") from e
                bad = {k: e for k, e in errs.items() if not e <= TOL[dtype]}
                assert not bad, (name, dtype, cu, bad)
                for key, e in errs.items():
                    worst[key] = max(worst.get(key, 0.0), e)
            print(name, dtype, "worst", {k: f"{e:.2e}" for k, e in worst.items()})


def test_triton_gdn_on_fuzzed_packed_layouts():
    check_all()


def test_triton_gdn_k16_bf16_known_wrong():
    """The fault itself (kept visible until fixed): with the guard below, asking for our Triton
    kernels there is a ValueError, so this test bypasses nothing and stays xfail."""
    if pytest is not None:
        pytest.xfail("our Triton GDN kernels are wrong at K = 16 in bf16 on the H200")
    errs = run_layout([0, 256], *K16, torch.bfloat16)
    assert all(e <= TOL[torch.bfloat16] for e in errs.values()), errs


def test_auto_backend_is_right_at_k16_bf16():
    """The guard: 'auto' takes the chunked torch path at K < 32 in bf16 on CUDA (the tiny preset
    trains correctly on a GPU), and 'triton' is refused there with the reason."""
    for cu in ([0, 256], [0, 63, 64, 65, 127, 128, 256]):
        errs = run_layout(cu, *K16, torch.bfloat16, backend="auto")
        assert all(e <= TOL[torch.bfloat16] for e in errs.values()), (cu, errs)
    with pytest.raises(ValueError, match="key head dim 16 < 32"):
        run_layout([0, 256], *K16, torch.bfloat16, backend="triton")


def survey(n: int = 256) -> None:
    """Print every layout's errors without stopping (diagnosis)."""
    import os

    shapes = SHAPES
    if os.environ.get("SURVEY_SHAPES"):  # e.g. 6x16x32,30x96x192
        dims = [tuple(int(x) for x in s.split("x")) for s in os.environ["SURVEY_SHAPES"].split(",")]
        shapes = {f"{h}x{k}x{v}": (h, k, v) for h, k, v in dims}
    for name, (H, K, V) in shapes.items():
        for dtype in (torch.bfloat16, torch.float32):
            for cu in [[0, n], [0, 219, n], [0, 1, n]] + layouts(n)[:6]:
                errs = run_layout(cu, H, K, V, dtype)
                flag = "BAD" if any(not e <= TOL[dtype] for e in errs.values()) else "ok "
                print(
                    flag, name, dtype, cu[:6], len(cu) - 1, {k: f"{e:.1e}" for k, e in errs.items()}
                )


def fault_scan(n: int = 256) -> None:
    """Run each layout's forward + backward (no reference) in its own process, so a layout that
    makes a kernel fault is named and the others still run (a CUDA fault poisons the process)."""
    import os
    import subprocess
    import sys

    H, K, V = (int(x) for x in os.environ.get("SCAN_SHAPE", "30x96x192").split("x"))
    cases = layouts(n)
    for i, cu in enumerate(cases):
        code = (
            "import torch; from kernels.gdn import chunk_gated_delta_rule as f; "
            f"cu = {cu}; T = cu[-1]; H, K, V = {H}, {K}, {V}; "
            "g = torch.Generator(device='cuda').manual_seed(0); "
            "r = lambda *s: torch.randn(*s, generator=g, device='cuda'); "
            "x = [r(1,T,H,K), r(1,T,H,K), r(1,T,H,V), -torch.nn.functional.softplus(r(1,T,H)), "
            "torch.sigmoid(r(1,T,H))*2]; x = [t.bfloat16().requires_grad_() for t in x]; "
            "o, _ = f(*x, scale=K**-0.5, cu_seqlens=torch.tensor(cu, dtype=torch.int32, "
            "device='cuda'), use_qk_l2norm_in_kernel=True, backend='triton'); "
            "torch.cuda.synchronize(); print('FWD OK', flush=True); "
            "o.float().sum().backward(); torch.cuda.synchronize(); print('BWD OK')"
        )
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        said = [ln for ln in (p.stdout + p.stderr).splitlines() if "OK" in ln or "Error" in ln]
        print(f"{H}x{K}x{V} layout {i} docs {len(cu) - 1} first {cu[:5]}: {' | '.join(said)[:200]}")


if __name__ == "__main__":
    import sys

    if "--faults" in sys.argv:
        fault_scan()
        sys.exit(0)

    if "--survey" in sys.argv:
        survey()
        sys.exit(0)
    check_all()
    print("GDN PACKED FUZZ GPU OK")
