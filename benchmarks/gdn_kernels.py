"""Benchmark our Triton Gated DeltaNet kernels against fla and (for context) causal attention.

Prints a table and writes JSON (``--out``). Timings are ``triton.testing.do_bench`` medians in
milliseconds, bf16 inputs, in-kernel q/k L2 norm, no initial state:

* ``ours``: :func:`kernels.gdn.triton_chunk.chunk_gated_delta_rule_triton`
* ``fla (guard bypassed, timing only)``: fla's ``chunk_gated_delta_rule``. fla refuses its gated
  backward on Hopper with Triton < 3.7.1 (its dg/dbeta are wrong there, fla issue #640); the
  guard is switched off *for timing only* (``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True``).
* ``sdpa causal (context)``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``
  (flash backend), same batch, tokens and heads, head dim 128.

Columns: fwd and fwd+bwd ms, effective TFLOP/s (GDN: the chunked form's nominal matmul FLOPs,
see ``gdn_fwd_flops``; attention: causal q k^T and P v; fwd+bwd counted as 3x / 3.5x the
forward), peak CUDA memory of one fwd+bwd above the inputs, tokens per second. Shapes: Olmo
(30 heads, 96/192) and 32 heads x 128/128, 32K tokens per batch at T = 4K, 8K, 32K and one 64K
sequence (``--shapes`` picks by index). Then (unless ``--no-aux``) the layer's causal conv1d +
SiLU and gated RMSNorm kernels vs their unfused torch versions at Olmo Hybrid 7B widths.

Also reports the bf16 forward error of ours and fla against a float32 reference (our chunked
PyTorch implementation) at four shapes (``ERROR_SHAPES``, incl. a packed batch), and
(``--breakdown``) per-kernel CUDA times of ours and of fla.

    python benchmarks/gdn_kernels.py --out gdn_bench.json

``--sweep "cfg1;cfg2;..."`` instead times our kernels under several ``GDN_TRITON_CFG`` settings
(block sizes / warps / prefetch, see ``triton_chunk._Config``) at the first selected shape:
fwd, fwd+bwd, per-kernel CUDA times and a bf16 fwd+bwd error check against the float32 chunked
PyTorch reference, one row per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import kernels  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.gdn.chunk_torch import chunk_gated_delta_rule_torch  # noqa: E402
from kernels.gdn.triton_chunk import chunk_gated_delta_rule_triton  # noqa: E402

SHAPES = [  # (B, T, H, K, V): 32K tokens per batch, and one 64K sequence
    (4, 8192, 30, 96, 192),  # 0-2: the shapes quoted in BENCHMARKS.md
    (1, 32768, 30, 96, 192),
    (1, 32768, 32, 128, 128),
    (8, 4096, 30, 96, 192),
    (1, 65536, 30, 96, 192),
    (8, 4096, 32, 128, 128),
    (4, 8192, 32, 128, 128),
    (1, 65536, 32, 128, 128),
]
CHUNK = 64  # the chunk size of the nominal FLOP count


def gdn_fwd_flops(B, T, H, K, V) -> float:
    """Nominal matmul FLOPs of the chunked forward (chunk C = 64, UT inverse not counted): per
    token and head k k^T, W, q k^T (C K each), U, A u (C V each), W S, q S, k^T u (K V each)."""
    return 2.0 * B * T * H * (3 * CHUNK * K + 2 * CHUNK * V + 3 * K * V)


def sdpa_fwd_flops(B, T, H, D) -> float:
    """Causal attention forward: q k^T and P v over the lower triangle."""
    return 2.0 * B * H * T * T * D


FLA_LABEL = "fla (guard bypassed, timing only)"


def make_inputs(B, T, H, K, V, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    beta = torch.sigmoid(randn(B, T, H))
    A = torch.linspace(1.0, 16.0, H, device="cuda")
    g = -A * F.softplus(0.5 * randn(B, T, H) - 4.0)  # Olmo-like decays, g in roughly [-3, 0)
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), g=g, beta=beta.to(dtype))


def load_fla():
    try:
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdn
    except ImportError as e:
        print(f"fla not available ({e}); skipping its rows", flush=True)
        return None
    fla_chunk_o.TRITON_ABOVE_3_7_1 = True  # bypass the Hopper backward guard: timing only
    return fla_gdn


def gdn_fn(impl):
    def fn(inputs):
        o, _ = impl(**inputs, use_qk_l2norm_in_kernel=True)
        return o

    return fn


def sdpa_fn(inputs):
    return F.scaled_dot_product_attention(*inputs, is_causal=True)


def peak_mib(fn, inputs, leaves) -> float:
    """Peak CUDA memory of one fwd+bwd above what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(inputs)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    for t in leaves:
        t.grad = None
    return peak / 2**20


def bench(fn, inputs, leaves, backward: bool) -> float:
    import triton

    if not backward:
        with torch.no_grad():
            return triton.testing.do_bench(
                lambda: fn(inputs), warmup=25, rep=100, return_mode="median"
            )
    out = fn(inputs)
    grad = torch.randn_like(out)

    def step():
        fn(inputs).backward(grad)

    return triton.testing.do_bench(
        step, warmup=25, rep=100, grad_to_none=leaves, return_mode="median"
    )


ERROR_SHAPES = [  # (B, T, H, K, V, packed sequence lengths or None)
    (1, 8192, 30, 96, 192, None),
    (1, 32768, 30, 96, 192, None),
    (1, 8192, 32, 128, 128, None),
    (1, 8192, 30, 96, 192, [1, 100, 2000, 37, 4000, 63, 1991]),
]


def bf16_forward_errors(fla_gdn, shape) -> dict:
    """Forward error of bf16 runs against two float32 references (chunked PyTorch): on the
    float32 inputs (what a user loses by running in bf16, mostly the rounding of the inputs,
    common to every kernel) and on the same bf16-rounded inputs (the kernel's own error)."""
    B, T, H, K, V, lens = shape
    x32 = make_inputs(B, T, H, K, V, dtype=torch.float32, seed=1)
    x16 = {n: (t if n == "g" else t.to(torch.bfloat16)) for n, t in x32.items()}
    kw = dict(use_qk_l2norm_in_kernel=True)
    if lens is not None:
        kw["cu_seqlens"] = torch.tensor([0] + lens, device="cuda").cumsum(0)
    with torch.no_grad():
        refs = {
            "fp32_inputs": chunk_gated_delta_rule_torch(**x32, **kw)[0],
            "same_bf16_inputs": chunk_gated_delta_rule_torch(
                **{n: t.float() for n, t in x16.items()}, **kw
            )[0],
        }
        out = {"ours": chunk_gated_delta_rule_triton(**x16, **kw)[0]}
        if fla_gdn is not None:
            out[FLA_LABEL] = fla_gdn(**x16, **kw)[0]
    res = {}
    for name, o in out.items():
        for ref_name, ref in refs.items():
            d = (o.float() - ref).abs()
            res[f"{name} vs {ref_name}"] = {
                "max_abs_err_over_max_abs_ref": (d.max() / ref.abs().max()).item(),
                "rel_l2_err": (d.norm() / ref.norm()).item(),
            }
    return {"shape": shape, "reference": "chunk_torch float32", "errors": res}


def report_errors(fla_gdn, result: dict, flush) -> None:
    result["bf16_forward_error"] = []
    for shape in ERROR_SHAPES:
        res = bf16_forward_errors(fla_gdn, shape)
        result["bf16_forward_error"].append(res)
        flush()
        B, T, H, K, V, lens = shape
        where = f"B={B} T={T} H={H} K={K} V={V}" + (f" packed {len(lens)} seqs" if lens else "")
        print(f"\nbf16 forward error vs float32 chunk_torch at {where}:")
        for name, e in res["errors"].items():
            print(f"  {name:58s} max|err|/max|ref| = {e['max_abs_err_over_max_abs_ref']:.2e}  "
                  f"rel L2 = {e['rel_l2_err']:.2e}")  # fmt: skip


def kernel_breakdown(shape, impl=chunk_gated_delta_rule_triton) -> dict:
    """Per-kernel CUDA time (ms) of one fwd+bwd of ``impl`` (ours by default), torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    x = make_inputs(*shape)
    leaves = [t.requires_grad_(True) for t in x.values()]
    fn = gdn_fn(impl)
    for _ in range(2):
        fn(x).backward(torch.ones_like(fn(x)))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn(x)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
    del leaves
    times: dict[str, float] = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t > 0:
            times[evt.key] = times.get(evt.key, 0.0) + t / 1e3
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def grad_errors(shape, seed=2) -> dict:
    """bf16 fwd+bwd of ours vs the float32 chunked PyTorch reference: relative L2 errors of o and
    every gradient (NaN shows up as nan)."""
    x32 = make_inputs(*shape, dtype=torch.float32, seed=seed)
    res = {}
    outs = []
    for impl, dt in ((chunk_gated_delta_rule_torch, torch.float32),
                     (chunk_gated_delta_rule_triton, torch.bfloat16)):  # fmt: skip
        leaves = {n: (t if n == "g" else t.to(dt)).detach().requires_grad_(True)
                  for n, t in x32.items()}  # fmt: skip
        o, _ = impl(**leaves, use_qk_l2norm_in_kernel=True)
        gen = torch.Generator(device="cuda").manual_seed(seed + 1)
        do = torch.randn(o.shape, generator=gen, device="cuda")
        grads = torch.autograd.grad((o.float() * do).sum(), list(leaves.values()))
        outs.append(
            {"o": o.detach().float(), **{f"d{n}": g.float() for n, g in zip(leaves, grads)}}
        )
    for name, ref in outs[0].items():
        res[name] = ((outs[1][name] - ref).norm() / ref.norm()).item()
    return res


def sweep(configs: list[str], shape_idx: str, out_path: str) -> None:
    """Each setting in its own process: a setting that crashes (an illegal address leaves the
    CUDA context unusable) costs only its own row."""
    import subprocess

    rows = []
    for i, cfg in enumerate(configs):
        part = f"{out_path}.{i}"
        cmd = [sys.executable, __file__, "--no-fla", "--shapes", shape_idx, "--out", part,
               "--sweep-one", cfg]  # fmt: skip
        try:
            rc = subprocess.run(cmd, timeout=180).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0:
            print(f"[{cfg or 'default'}] FAILED (exit {rc})", flush=True)
            rows.append(dict(cfg=cfg, error=f"exit {rc}"))
        else:
            rows.append(json.loads(Path(part).read_text()))
        Path(out_path).write_text(json.dumps(dict(shape_idx=shape_idx, rows=rows), indent=2))


def sweep_one(cfg: str, shape, out_path: str) -> None:
    os.environ["GDN_TRITON_CFG"] = cfg
    t0 = time.time()
    # smoke first: one chunk per sequence, and a short fwd+bwd against the float32 reference
    small = grad_errors((2, 64) + tuple(shape[2:]))
    err = grad_errors((1, 2048) + tuple(shape[2:]))
    x = make_inputs(*shape)
    leaves = [t.requires_grad_(True) for t in x.values()]
    fn = gdn_fn(chunk_gated_delta_rule_triton)
    fn(x).sum().backward()
    torch.cuda.synchronize()
    warm = time.time() - t0
    fwd = bench(fn, x, leaves, backward=False)
    fwdbwd = bench(fn, x, leaves, backward=True)
    peak = peak_mib(fn, x, leaves)  # settings such as save_fwd trade memory for time
    del x, leaves
    bd = kernel_breakdown(shape)
    row = dict(cfg=cfg, fwd_ms=fwd, fwd_bwd_ms=fwdbwd, peak_mib=peak, breakdown_ms=bd, errors=err,
               errors_T64=small, first_call_s=warm)  # fmt: skip
    Path(out_path).write_text(json.dumps(row, indent=2))
    kern = " ".join(f"{k.strip('_').removesuffix('_kernel')}={t:.2f}"
                    for k, t in bd.items() if k.startswith("_"))  # fmt: skip
    worst = max(max(err.values()), max(small.values()))
    print(f"[{cfg or 'default'}] fwd {fwd:.2f} fwd+bwd {fwdbwd:.2f} ms, peak {peak:.0f} MiB "
          f"(warm-up {warm:.0f}s) "
          f"max bf16 rel err {worst:.1e} | {kern}", flush=True)  # fmt: skip


def conv_and_norm_rows(T: int = 32768, H: int = 30, K: int = 96, V: int = 192) -> list[dict]:
    """The GDN layer's other two kernels at Olmo Hybrid 7B widths, ours vs the unfused torch
    versions, bf16: causal conv1d + SiLU (W = 4) over the q, k, v channels (H (2K + V)), and the
    gated RMSNorm on T H rows of width V (gate as the mixer's strided view of its projection)."""
    from kernels.conv import causal_conv1d_torch
    from kernels.conv_triton import causal_conv1d_triton
    from kernels.gated_rmsnorm import gated_rmsnorm

    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(torch.bfloat16)

    C, W = H * (2 * K + V), 4
    x, w = randn(1, T, C).requires_grad_(True), (0.5 * randn(C, W)).requires_grad_(True)
    xn = randn(1, T, H, V).requires_grad_(True)
    proj = randn(1, T, H, 2 * K + 2 * V)
    gate, nw = proj[..., 2 * K + V :], (1 + 0.3 * randn(V)).requires_grad_(True)
    cases = [
        ("conv1d+silu", f"[1, {T}, {C}] W={W}", (x, w), {
            "ours": lambda _: causal_conv1d_triton(x, w, None, "silu"),
            "torch (unfused)": lambda _: causal_conv1d_torch(x, w, None, "silu"),
        }),
        ("gated rmsnorm", f"[{T * H}, {V}]", (xn, nw), {
            "ours": lambda _: gated_rmsnorm(xn, gate, nw, backend="triton"),
            "torch (unfused)": lambda _: gated_rmsnorm(xn, gate, nw, backend="torch"),
        }),
    ]  # fmt: skip
    rows = []
    print(f"\n{'op':14s} {'shape':24s} {'impl':16s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} "
          f"{'peak MiB':>9s}")  # fmt: skip
    for op, shape, leaves, impls in cases:
        for name, fn in impls.items():
            fn(None).sum().backward()  # compile outside the timing
            fwd = bench(fn, None, list(leaves), backward=False)
            fwdbwd = bench(fn, None, list(leaves), backward=True)
            peak = peak_mib(fn, None, list(leaves))
            rows.append(dict(op=op, shape=shape, impl=name, fwd_ms=fwd, fwd_bwd_ms=fwdbwd,
                             peak_mib=peak))  # fmt: skip
            print(f"{op:14s} {shape:24s} {name:16s} {fwd:8.3f} {fwdbwd:11.3f} {peak:9.0f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="per-kernel times of ours and fla")
    ap.add_argument("--no-aux", action="store_true", help="skip the conv1d / gated-norm rows")
    ap.add_argument("--errors-only", action="store_true", help="only the bf16 error table")
    ap.add_argument("--no-errors", action="store_true", help="skip the bf16 error table")
    ap.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES")
    ap.add_argument("--sweep", help="';'-separated GDN_TRITON_CFG settings to compare")
    ap.add_argument("--sweep-one", help=argparse.SUPPRESS)  # one setting (a --sweep child)
    args = ap.parse_args()

    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    if args.sweep_one is not None:
        sweep_one(args.sweep_one, shapes[0], args.out)
        return
    if args.sweep is not None:
        sweep(args.sweep.split(";"), args.shapes.split(",")[0].replace("all", "0"), args.out)
        return
    fla_gdn = None if args.no_fla else load_fla()
    impls = {"ours": gdn_fn(chunk_gated_delta_rule_triton)}
    if fla_gdn is not None:
        impls[FLA_LABEL] = gdn_fn(fla_gdn)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": "bfloat16",
        "timing": "triton.testing.do_bench median, ms",
        "rows": [],
    }

    def flush():
        Path(args.out).write_text(json.dumps(result, indent=2))

    print(f"{'impl':38s} {'B':>2s} {'T':>6s} {'H':>3s} {'K':>4s} {'V':>4s} {'fwd ms':>8s} "
          f"{'fwd+bwd ms':>11s} {'TF/s fwd':>8s} {'TF/s f+b':>8s} {'peak MiB':>9s} "
          f"{'Mtok/s f+b':>10s}", flush=True)  # fmt: skip

    def report(name, B, T, H, K, V, fwd, fwdbwd, flops, peak, **extra):
        # fwd+bwd counted as 3 x the forward's FLOPs for GDN, 3.5 x for attention (the usual
        # conventions: a backward has twice / 2.5 times the forward's matmul work)
        tf_f, tf_fb = flops[0] / fwd / 1e9, flops[1] / fwdbwd / 1e9
        result["rows"].append(dict(impl=name, B=B, T=T, H=H, K=K, V=V, fwd_ms=fwd,
                                   fwd_bwd_ms=fwdbwd, tflops_fwd=tf_f, tflops_fwd_bwd=tf_fb,
                                   peak_mib=peak, **extra))  # fmt: skip
        flush()
        print(f"{name:38s} {B:2d} {T:6d} {H:3d} {K:4d} {V:4d} {fwd:8.2f} {fwdbwd:11.2f} "
              f"{tf_f:8.1f} {tf_fb:8.1f} {peak:9.0f} {B * T / fwdbwd / 1e3:10.2f}",
              flush=True)  # fmt: skip

    for B, T, H, K, V in [] if args.errors_only else shapes:
        flops = gdn_fwd_flops(B, T, H, K, V)
        for name, fn in impls.items():
            x = make_inputs(B, T, H, K, V)
            leaves = [t.requires_grad_(True) for t in x.values()]
            t0 = time.time()
            fn(x).sum().backward()  # compile / autotune outside the timing
            warm_s = time.time() - t0
            fwd = bench(fn, x, leaves, backward=False)
            fwdbwd = bench(fn, x, leaves, backward=True)
            peak = peak_mib(fn, x, leaves)
            del x, leaves
            report(name, B, T, H, K, V, fwd, fwdbwd, (flops, 3 * flops), peak,
                   first_call_s=warm_s)  # fmt: skip
        D = 128
        qkv = [
            torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        ]
        fwd = bench(sdpa_fn, qkv, qkv, backward=False)
        fwdbwd = bench(sdpa_fn, qkv, qkv, backward=True)
        peak = peak_mib(sdpa_fn, qkv, qkv)
        flops = sdpa_fwd_flops(B, T, H, D)
        report("sdpa causal (context, head dim 128)", B, T, H, D, D, fwd, fwdbwd,
               (flops, 3.5 * flops), peak)  # fmt: skip
        del qkv
        torch.cuda.empty_cache()
    if not (args.no_aux or args.errors_only):
        result["conv_and_norm"] = conv_and_norm_rows()
        flush()

    if not args.no_errors:
        report_errors(fla_gdn, result, flush)

    if args.breakdown and not args.errors_only:
        sources = {"ours": chunk_gated_delta_rule_triton}
        if fla_gdn is not None:  # where fla spends its time, to compare kernel by kernel
            sources[FLA_LABEL] = fla_gdn
        for shape in shapes:
            for name, impl in sources.items():
                bd = kernel_breakdown(shape, impl)
                key = str(shape) if name == "ours" else f"{name} {shape}"
                result.setdefault("breakdown_ms", {})[key] = bd
                flush()
                print(f"\nper-kernel CUDA ms, one fwd+bwd of {name} at {shape}:")
                for k, t in list(bd.items())[:16]:
                    print(f"  {t:8.3f}  {k[:90]}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
