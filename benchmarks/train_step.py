"""Training-step benchmark: our trainer against upstream megatron-core and OLMo-core, one GPU.

    python benchmarks/train_step.py                       # every side, prints a table, writes JSON
    python benchmarks/train_step.py --sides ours,upstream # a subset (results merge into the JSON)
    python benchmarks/train_step.py --sides ours,ours_fp8_delayed,ours_fp8_tensorwise  # FP8
    python benchmarks/train_step.py --profile             # where our step's time goes, by module
    python benchmarks/train_step.py --tiny --sides ours   # CPU smoke run of the harness itself

The proxy is Olmo-Hybrid-7B widths with 8 blocks, ``G-G-G-*-`` x 2 (d 3840, 30 GDN heads of
96/192, 30 attention heads, MLP 11008, vocab 100352), seq 8192, micro-batch 1, bf16, random
tokens. Each side runs in its own process (a clean allocator; an OOM stays one row of the table).

Sides:
- ``ours``: our trainer exactly as ``megatron-hybrid-train`` runs it (te spec, megatron DDP with
  fp32 grads, fp32 master weights, Adam), global batch 1 and 8 micro-batches (accumulation);
- ``ours_pa``: the same with ``--use-precision-aware-optimizer`` (bf16 moments);
- ``ours_fp8_delayed`` / ``ours_fp8_tensorwise`` (not in the default set): the same with FP8
  GEMMs, ``--fp8-format hybrid --fp8-recipe delayed`` / ``tensorwise`` (plus ``--ours-flags``);
  JSON keys ``ours_fp8_delayed_tokens_per_s_per_gpu``, ``ours_fp8_tensorwise_tokens_per_s_per_gpu``
  and ``ours_fp8_peak_gib`` (the delayed side's peak); ``ours_fp8_params``: delayed with the
  weights stored in FP8 (``--fp8-param-gather --use-distributed-optimizer``);
- ``attention``: our all-attention model of the same widths (``*-`` x 8);
- ``seq32k`` / ``seq64k``: ours, hybrid and all-attention, at seq 32768 / 65536, micro-batch 1,
  both with the same ``--long-flags`` (default: full recompute of every layer and the
  precision-aware distributed optimizer with bf16 moments -- what fits both models on an 80 GB
  H100 at 32K and 64K; selective recompute of gdn, mlp, layernorm ran out of memory there);
- ``upstream``: megatron-core 0.19.2 ``HybridModel`` with its own TE spec
  (``<peers>/hybrid_step.py``; fla's Hopper guard is bypassed there for timing only);
- ``olmo_core``: OLMo-core 3.0.0, eager and ``apply_compile()`` (``<peers>/olmo_core_step.py``).
The peers' scripts are ../shared/gpu/reference/ (stage them with ``--peers``); both train bf16
parameters with torch's fused AdamW (no fp32 master copy) -- the table says so.

Timing: CUDA events, medians; warm-up steps (Triton autotune, TE init) excluded. fwd+bwd is one
micro-batch through megatron's schedule; a step includes zeroing, the optimizer and the report.
MFU uses our FLOPs model (training/flops.py) and the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROXY = ["--preset", "olmo_hybrid_7b", "--hybrid-layer-pattern", "G-G-G-*-G-G-G-*-"]
ATTENTION = "*-*-*-*-*-*-*-*-"
# FP8 sides: our trainer with --fp8-format hybrid and this --fp8-recipe
FP8_SIDES = {
    "ours_fp8_delayed": "delayed",
    "ours_fp8_tensorwise": "tensorwise",
    "ours_fp8_params": "delayed",  # + FP8 weights as the model's parameters (below)
}
# the weights themselves in FP8 (TE's quantized model init): no bf16 weight copy next to the FP8
# one, which is what keeps the plain FP8 sides ~1 byte/parameter above bf16's peak memory
FP8_PARAM_FLAGS = ["--fp8-param-gather", "--use-distributed-optimizer"]


# ---- one side, in this process -----------------------------------------------------------------


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def measure_ours(args) -> dict:
    """Build our Trainer for the proxy and time fwd+bwd, a full step at global batch 1 and at
    8 micro-batches."""
    import torch

    from megatron_hybrid.training.cli import parse
    from megatron_hybrid.training.loop import Trainer

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    gbs_big = 1 if args.no_accumulation else 8
    flags = [
        *(["--preset", "tiny"] if args.tiny else PROXY),
        "--mock-data",
        "--seq-length",
        str(args.seq),
        "--max-position-embeddings",
        str(max(args.seq, 4096)),
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        str(gbs_big),
        "--train-iters",
        "1000",
        "--lr",
        "1e-5",
        "--min-lr",
        "1e-6",
        "--log-interval",
        "1000",
        *args.flags,
    ]
    if args.pattern:
        flags += ["--hybrid-layer-pattern", args.pattern]
    if not args.tiny:
        flags += ["--spec", "te", "--bf16"]
    run, _ = parse(flags)
    t0 = time.time()
    tr = Trainer(run, log=lambda s: None).setup()
    setup_s = time.time() - t0
    for m in tr.chunks:
        m.train()
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timer():
        if cuda:
            return torch.cuda.Event(enable_timing=True)
        return None

    def elapsed(a, b):
        return a.elapsed_time(b) if cuda else (b - a) * 1e3

    def now(ev):
        if cuda:
            ev.record()
            return ev
        return time.perf_counter()

    def steps(gbs, n):
        run.train.global_batch_size = gbs
        times = []
        for _ in range(n):
            a = now(timer())
            tr.train_step()
            b = now(timer())
            sync()
            times.append(elapsed(a, b))
            tr.consumed += gbs
        return times

    warm = 1 if args.tiny else 3
    n = 2 if args.tiny else args.steps
    steps(1, warm)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # fwd+bwd of one micro-batch through megatron's schedule (no optimizer, no zeroing)
    fb = []
    for _ in range(n + 1):
        mbs = tr._microbatches(tr.train_ds, tr.consumed, 1)
        a = now(timer())
        tr._run_schedule(mbs, forward_only=False)
        b = now(timer())
        sync()
        fb.append(elapsed(a, b))
    for m in tr.chunks:
        m.zero_grad_buffer()
    step1 = steps(1, n)
    res = {
        "setup_s": round(setup_s, 1),
        "fwdbwd_ms": _median(fb[1:]),
        "step_ms": _median(step1),
        "tokens_per_s_per_gpu": args.seq / _median(step1) * 1e3,
    }
    if gbs_big > 1:
        steps(gbs_big, 1)
        step8 = steps(gbs_big, max(2, n // 2))
        res["gbs8_step_ms"] = _median(step8)
        res["gbs8_tokens_per_s_per_gpu"] = gbs_big * args.seq / _median(step8) * 1e3
    flops = tr.flops["total"]
    peak = tr.peak
    for key in ("tokens_per_s_per_gpu", "gbs8_tokens_per_s_per_gpu"):
        if key in res and peak:
            res[key.replace("tokens_per_s_per_gpu", "mfu")] = flops * res[key] / 1e12 / peak
    if cuda:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["gpu"] = torch.cuda.get_device_name()
    res["flops_per_token"] = flops
    res["setup"] = (
        f"ours: {tr.flavour} spec, megatron DDP fp32 grads, "
        + (
            "precision-aware Adam"
            if run.optim.precision_aware_optimizer
            else "fp32 master weights + fp32 Adam moments"
        )
        + (
            ", grad-accumulation fusion"
            if run.train.gradient_accumulation_fusion and tr.flavour == "te"
            else ""
        )
        + (f", {' '.join(args.flags)}" if args.flags else "")
    )
    if args.profile:
        res["profile"] = profile_ours(tr, args)
    return res


# Kernel-name patterns -> module category, first match wins (CUDA kernel names on the H200).
CATEGORIES = [
    ("loss", r"_row_stats_kernel|_grad_kernel|cross_entropy"),
    ("optimizer", r"multi_tensor|adam|Adam|_foreach|LpNorm"),
    ("communication", r"nccl|allreduce|all_gather|reduce_scatter"),
    ("conv", r"_conv"),
    ("norms", r"rmsnorm|_norm_|layernorm|rmsnorm"),
    ("GDN recurrence", r"chunk|gdn|delta|_wy|_fwd_|_bwd_|_l2norm|recurrence|transition|kkt"),
    ("attention", r"flash|fmha|attn|attention|sdpa|cudnn"),
    ("GEMM", r"gemm|cutlass|nvjet|sm90_xmma|cublas|matmul|wgrad|dgrad|^aten::(addmm|mm|bmm)$"),
    ("elementwise / copies", r"elementwise|vectorized|copy|fill|reduce|index|cat|unrolled"),
]


def profile_ours(tr, args) -> dict:
    """Kernel time per category, and per model module x category (benchmarks/module_profile.py),
    over 2 full steps at global batch 1 (torch.profiler), ms per step. On CPU (the harness test)
    op CPU time stands in for kernel time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import module_profile

    def category(name):
        return next((c for c, pat in CATEGORIES if re.search(pat, name, re.I)), "other")

    cuda = torch.cuda.is_available()
    tr.run.train.global_batch_size = 1  # one micro-batch per step: fwd+bwd + optimizer
    unlabel = module_profile.label_modules(tr.chunks)
    try:
        activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
        with profile(activities=[activity, ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                tr.train_step()
            if cuda:
                torch.cuda.synchronize()
    finally:
        unlabel()
    by_cat: dict[str, float] = {}
    top: dict[str, float] = {}
    by_module = module_profile.attribute(prof.events(), category, cpu=not cuda)
    for row in by_module.values():
        for cat, us in row.items():
            by_cat[cat] = by_cat.get(cat, 0.0) + us / 1e3 / 2
    if cuda:
        for ev in prof.key_averages():
            us = ev.self_device_time_total
            if us and ev.device_type.name == "CUDA":
                top[ev.key] = top.get(ev.key, 0.0) + us / 1e3 / 2
    out = {"what": f"global batch 1, seq {args.seq}" + ("" if cuda else ", CPU op time")}
    out["ms_per_step_by_category"] = dict(sorted(by_cat.items(), key=lambda kv: -kv[1]))
    out["top_kernels_ms_per_step"] = dict(sorted(top.items(), key=lambda kv: -kv[1])[:25])
    out["ms_per_step_by_module"] = {
        m: {c: us / 1e3 / 2 for c, us in sorted(row.items(), key=lambda kv: -kv[1])}
        for m, row in by_module.items()
    }
    return out


# ---- the orchestrator ----------------------------------------------------------------------------


def _run(cmd, env=None, timeout=900) -> tuple[dict | list, str]:
    """Run one side; returns (parsed RESULT json(s), tail of output). An env value of None
    removes that variable for the child."""
    t0 = time.time()
    child_env = {**os.environ, **(env or {})}
    child_env = {k: v for k, v in child_env.items() if v is not None}
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    found = [json.loads(m) for m in re.findall(r"^RESULT (\{.*\})$", proc.stdout, re.M)]
    if not found:
        err = [ln for ln in out.splitlines() if "Error" in ln or "error" in ln][-3:]
        found = [{"error": " | ".join(err) or f"exit {proc.returncode}", "rc": proc.returncode}]
    print(f"  ({time.time() - t0:.0f} s) {' '.join(cmd[1:4])}", file=sys.stderr, flush=True)
    return (found[0] if len(found) == 1 else found), out[-4000:]


def _ours_cmd(args, *extra):
    cmd = [sys.executable, __file__, "--child", "--seq", str(args.seq), "--steps", str(args.steps)]
    if args.tiny:
        cmd.append("--tiny")
    return cmd + list(extra)


def orchestrate(args, save=lambda results, logs: None) -> dict:
    """Run the sides in order; ``save`` is called after each (a killed run keeps what it has)."""
    sides = args.sides.split(",")
    results: dict = {}
    peers = Path(args.peers)
    logs = {}
    for i, side in enumerate(sides):
        if i:
            save(results, logs)
        print(f"side {side} ...", file=sys.stderr, flush=True)
        if side == "ours":
            extra = ["--profile"] if args.profile_ours else []
            results["ours"], logs[side] = _run(
                _ours_cmd(args, *extra, *_flag_args(args.ours_flags))
            )
        elif side == "ours_pa":
            pa = ["--use-precision-aware-optimizer", "--use-distributed-optimizer"]
            pa += ["--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16"]
            results["ours_pa"], logs[side] = _run(_ours_cmd(args, *_flag_args(pa)))
        elif side in FP8_SIDES:  # the same trainer with FP8 GEMMs (docs/training.md, "FP8")
            fp8 = ["--fp8-format", "hybrid", "--fp8-recipe", FP8_SIDES[side]]
            fp8 += FP8_PARAM_FLAGS if side == "ours_fp8_params" else []
            prof = ["--profile"] if side in args.profile_sides.split(",") else []
            results[side], logs[side] = _run(
                _ours_cmd(args, *prof, *_flag_args([*fp8, *args.ours_flags]))
            )
        elif side == "attention":
            results["attention"], logs[side] = _run(_ours_cmd(args, "--pattern", ATTENTION))
        elif side in ("seq32k", "seq64k"):
            extra = _flag_args(args.long_flags.split())
            length = {"seq32k": 32768, "seq64k": 65536}[side]
            for name, pat in ((f"{side}_hybrid", None), (f"{side}_attention", ATTENTION)):
                cmd = _ours_cmd(args, "--no-accumulation", *extra)
                cmd[cmd.index("--seq") + 1] = str(length)
                cmd[cmd.index("--steps") + 1] = "3"
                if pat:
                    cmd += ["--pattern", pat]
                results[name], logs[name] = _run(cmd)
        elif side == "upstream":
            pats = [("upstream", "G-G-G-*-G-G-G-*-")]
            if args.upstream_attention:
                pats.append(("upstream_attention", ATTENTION))
            for name, pat in pats:
                cmd = [sys.executable, str(peers / "hybrid_step.py"), pat, "bf16"]
                results[name], logs[name] = _run(cmd, {"SEQ": str(args.seq)})
        elif side == "olmo_core":
            env = {
                "PYTHONPATH": f"{args.oc_site}:{peers / 'ocstub'}:{os.environ.get('PYTHONPATH', '')}",
                # its compiled side is torch.compile: a TORCHDYNAMO_DISABLE=1 inherited from
                # scripts/gpu_checks.sh silently turned it into a second eager run (2026-12-05)
                "TORCHDYNAMO_DISABLE": None,
            }
            r, logs[side] = _run(
                [sys.executable, str(peers / "olmo_core_step.py"), "eager,compile"], env
            )
            for item in r if isinstance(r, list) else [r]:
                results["olmo_core_" + str(item.get("mode", "error"))] = item
        else:
            raise SystemExit(f"unknown side {side!r}")
    return {"results": results, "logs": logs}


def _flag_args(flags) -> list[str]:
    return [f"--flag={f}" for f in flags]


def summarise(results: dict) -> dict:
    """The flat JSON keys the issue names (only for sides that ran)."""
    out = {}

    def put(key, side, field):
        v = results.get(side, {})
        if isinstance(v, dict) and field in v:
            out[key] = v[field]

    put("ours_bf16_tokens_per_s_per_gpu", "ours", "tokens_per_s_per_gpu")
    put("ours_bf16_gbs8_tokens_per_s_per_gpu", "ours", "gbs8_tokens_per_s_per_gpu")
    put("ours_fwdbwd_ms", "ours", "fwdbwd_ms")
    put("ours_bf16_mfu", "ours", "mfu")
    put("ours_bf16_gbs8_mfu", "ours", "gbs8_mfu")
    put("ours_peak_gib", "ours", "peak_gib")
    put("ours_precision_aware_tokens_per_s_per_gpu", "ours_pa", "tokens_per_s_per_gpu")
    put("ours_precision_aware_gbs8_tokens_per_s_per_gpu", "ours_pa", "gbs8_tokens_per_s_per_gpu")
    put("ours_precision_aware_peak_gib", "ours_pa", "peak_gib")
    put("ours_fp8_delayed_tokens_per_s_per_gpu", "ours_fp8_delayed", "tokens_per_s_per_gpu")
    put(
        "ours_fp8_delayed_gbs8_tokens_per_s_per_gpu",
        "ours_fp8_delayed",
        "gbs8_tokens_per_s_per_gpu",
    )
    put("ours_fp8_peak_gib", "ours_fp8_delayed", "peak_gib")
    put("ours_fp8_params_gbs8_tokens_per_s_per_gpu", "ours_fp8_params", "gbs8_tokens_per_s_per_gpu")
    put("ours_fp8_params_peak_gib", "ours_fp8_params", "peak_gib")
    put("ours_fp8_tensorwise_tokens_per_s_per_gpu", "ours_fp8_tensorwise", "tokens_per_s_per_gpu")
    put(
        "ours_fp8_tensorwise_gbs8_tokens_per_s_per_gpu",
        "ours_fp8_tensorwise",
        "gbs8_tokens_per_s_per_gpu",
    )
    put("ours_fp8_tensorwise_peak_gib", "ours_fp8_tensorwise", "peak_gib")
    put("upstream_bf16_tokens_per_s_per_gpu", "upstream", "tok_s")
    put("upstream_fwdbwd_ms", "upstream", "fwdbwd_ms_median")
    put("upstream_attention_tokens_per_s_per_gpu", "upstream_attention", "tok_s")
    put("olmo_core_eager_tokens_per_s_per_gpu", "olmo_core_eager", "tok_s")
    put("olmo_core_compiled_tokens_per_s_per_gpu", "olmo_core_compile", "tok_s")
    put("olmo_core_compiled_fwdbwd_ms", "olmo_core_compile", "fwdbwd_ms_median")
    put("attention_only_bf16_tokens_per_s_per_gpu", "attention", "tokens_per_s_per_gpu")
    put("attention_only_fwdbwd_ms", "attention", "fwdbwd_ms")
    put("seq32k_hybrid_tokens_per_s_per_gpu", "seq32k_hybrid", "tokens_per_s_per_gpu")
    put("seq32k_attention_tokens_per_s_per_gpu", "seq32k_attention", "tokens_per_s_per_gpu")
    put("seq32k_hybrid_peak_gib", "seq32k_hybrid", "peak_gib")
    put("seq32k_attention_peak_gib", "seq32k_attention", "peak_gib")
    put("seq64k_hybrid_tokens_per_s_per_gpu", "seq64k_hybrid", "tokens_per_s_per_gpu")
    put("seq64k_attention_tokens_per_s_per_gpu", "seq64k_attention", "tokens_per_s_per_gpu")
    put("seq64k_hybrid_peak_gib", "seq64k_hybrid", "peak_gib")
    put("seq64k_attention_peak_gib", "seq64k_attention", "peak_gib")
    gpu = next(
        (v.get("gpu") for v in results.values() if isinstance(v, dict) and v.get("gpu")), None
    )
    if gpu:
        out["gpu"] = gpu
    return out


def table(results: dict) -> str:
    rows = [
        "| side | tokens/s/GPU (gbs 1) | tokens/s/GPU (8 micro-batches) | MFU | step ms | "
        "fwd+bwd ms | peak GiB | setup |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(x, spec=",.0f"):
        return format(x, spec) if isinstance(x, (int, float)) else "-"

    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error'][:120]} | | | | | | |")
            continue
        tok = r.get("tokens_per_s_per_gpu", r.get("tok_s"))
        mfu = r.get("mfu")
        rows.append(
            f"| {name} | {f(tok)} | {f(r.get('gbs8_tokens_per_s_per_gpu'))} | "
            f"{f(100 * mfu, '.1f') + '%' if mfu else '-'} | {f(r.get('step_ms', r.get('step_ms_median')), '.1f')} | "
            f"{f(r.get('fwdbwd_ms', r.get('fwdbwd_ms_median')), '.1f')} | "
            f"{f(r.get('peak_gib', r.get('peak_mem_GiB')), '.1f')} | "
            f"{r.get('setup', 'bf16 params, torch fused AdamW (no master copy)')} |"
        )
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", default="ours,ours_pa,attention,upstream,olmo_core,seq32k")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    ap.add_argument("--peers", default=str(ROOT / ".gpu" / "reference"))
    ap.add_argument("--oc-site", default="/tmp/oc", help="where OLMo-core's wheels are installed")
    ap.add_argument("--ours-flags", nargs="*", default=[], help="extra trainer flags for 'ours'")
    ap.add_argument(
        "--long-flags",
        default=(
            "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1 "
            "--use-precision-aware-optimizer --use-distributed-optimizer "
            "--exp-avg-dtype bf16 --exp-avg-sq-dtype bf16"
        ),
        help="trainer flags of the seq32k / seq64k sides (both models get the same)",
    )
    ap.add_argument("--json", default=str(RESULTS / "train_step_h200.json"))
    ap.add_argument("--profile", action="store_true", help="our step's time by module")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
    ap.add_argument(
        "--upstream-attention",
        action="store_true",
        help="'upstream' also runs megatron-core's all-attention model",
    )
    ap.add_argument(
        "--profile-ours", action="store_true", help="the 'ours' side also profiles its step"
    )
    ap.add_argument(
        "--profile-sides",
        default="",
        help="comma-separated FP8 sides that also profile their step (e.g. ours_fp8_params: "
        "its optimizer step costs ~115 ms more than the plain FP8 side's, H100 2026-12-05)",
    )
    # child-process options
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pattern", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--flag", dest="flags", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--no-accumulation", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.flags = [x for f in args.flags for x in f.split()]

    if args.child:
        try:
            res = measure_ours(args)
        except Exception as e:  # an OOM is a result (one row), not a crash of the harness
            res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if args.profile:
        res = measure_ours(args)
        print_profile(res["profile"])
        out = Path(os.environ.get("OUT", RESULTS)) / "train_step_profile.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        return 0
    t0 = time.time()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    logdir = Path(os.environ.get("OUT", path.parent))
    logdir.mkdir(parents=True, exist_ok=True)

    def save(results, logs):
        merged = {**old.get("results", {}), **results}
        record = {
            **{k: v for k, v in old.items() if k != "results"},
            **summarise(merged),
            "results": merged,
            "command": "python "
            + " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
            "versions": _versions(),
            "wall_s": round(time.time() - t0),
        }
        path.write_text(json.dumps(record, indent=1))
        (logdir / "train_step_logs.json").write_text(json.dumps(logs, indent=1))
        if logdir != path.parent:
            (logdir / path.name).write_text(json.dumps(record, indent=1))
        for name, r in results.items():
            print(f"RESULT-{name} {json.dumps(r)[:600]}", file=sys.stderr, flush=True)
        return merged

    done = orchestrate(args, save)
    merged_results = save(done["results"], done["logs"])
    for name, r in done["results"].items():
        if isinstance(r, dict) and "profile" in r:
            print(f"\n== profile of side {name}")
            print_profile(r["profile"])
    print(table(merged_results))
    print(f"\nwritten: {path}")
    return 0


def print_profile(prof: dict) -> None:
    """Category table and module x category table (markdown, for BENCHMARKS.md), top kernels."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import module_profile

    total = sum(prof["ms_per_step_by_category"].values())
    print(f"time per step ({prof.get('what', '')}), total {total:.1f} ms")
    print("| category | ms per step | share |\n|---|---|---|")
    for k, v in prof["ms_per_step_by_category"].items():
        print(f"| {k} | {v:.1f} | {100 * v / total:.1f}% |")
    if prof.get("ms_per_step_by_module"):
        print("\nby module (forward ranges; backward ops matched to them by autograd sequence nr):")
        us = {
            m: {c: v * 1e3 for c, v in row.items()}
            for m, row in prof["ms_per_step_by_module"].items()
        }
        print(module_profile.table(us))
    if prof.get("top_kernels_ms_per_step"):
        print("\ntop kernels (ms per step):")
    for k, v in prof["top_kernels_ms_per_step"].items():
        print(f"  {v:8.2f}  {k[:110]}")


def _versions() -> dict:
    out = {}
    for mod in ("torch", "triton", "megatron.core", "transformer_engine"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
