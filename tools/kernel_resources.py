"""Registers and spills of every GDN Triton kernel one fwd+bwd launches (and, with
``--conv-norm``, of the layer's conv1d and gated-norm kernels), compiled for a GPU architecture
on a machine without one. ``--mlp-qknorm`` adds the MLP's SwiGLU and attention's QK-norm.

Tuning the kernels (``GDN_TRITON_CFG``, see ``kernels/gdn/triton_chunk._Config``) is mostly a
matter of registers: a tile that spills, or a register count that halves the programs an SM
holds, shows in the timings. Both can be read without a GPU. This tool runs the real host code
of ``kernels.gdn.triton_chunk`` (compiled mode) on CPU tensors of the given shape, with Triton's
driver replaced by a stand-in that reports the chosen target, and turns every launch into
``warmup`` (compile, do not run). Each kernel is compiled with exactly the constexprs, warps and
stages the host code picks (state-pass V slices as on a GPU with ``--sms`` multiprocessors), and
``cuobjdump -res-usage`` reads registers, spill stack and shared memory from its cubin. The
outputs are never computed, so nothing here checks results: the tests do that.

    .venv/bin/python tools/kernel_resources.py --shape 4,8192,30,96,192 --conv-norm 11520,192
    GDN_TRITON_CFG=tinv_f32=0,w_fstate=4 .venv/bin/python tools/kernel_resources.py --arch 90

Prints one row per distinct compiled kernel (name, warps, stages, registers per thread, spill
stack bytes, dynamic shared memory, programs per SM that registers, shared memory and warps
allow) and, with ``--json``, writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_resources.py compiles kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REGS_PER_SM = 65536  # sm_80 .. sm_90
SMEM_PER_SM = 227 * 1024  # sm_90 (sm_80: 163 KB)
MAX_WARPS_PER_SM = 64


class _CompileOnlyDriver:
    """What JITFunction.run asks of the driver before a launch: a target, a device, a stream."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _cuobjdump() -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        sys.exit(f"cuobjdump not found at {path} (it ships with Triton's NVIDIA backend)")
    return str(path)


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out.stdout))
    return {k.lower(): int(v) for k, v in fields.items()}


@contextlib.contextmanager
def compile_only(arch: int):
    """Within: every Triton launch compiles for sm_<arch> and is not run; yields the rows."""
    previous = driver._active  # None on a machine without a GPU; reset_active() would raise
    driver.set_active(_CompileOnlyDriver(arch))
    rows: dict[tuple, dict] = {}
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        warps = kernel.metadata.num_warps
        key = (self.__name__, warps, kernel.hash)
        if key not in rows:
            res = _resources(kernel.asm["cubin"])
            smem = kernel.metadata.shared  # dynamic shared memory the launch asks for
            per_sm = min(
                REGS_PER_SM // max(1, res.get("reg", 1) * 32 * warps),
                SMEM_PER_SM // max(1, smem),
                MAX_WARPS_PER_SM // warps,
            )
            rows[key] = dict(kernel=self.__name__, warps=warps, stages=kernel.metadata.num_stages,
                             reg=res.get("reg", 0), spill=res.get("stack", 0), smem=smem,
                             programs_per_sm=per_sm)  # fmt: skip
        return kernel

    JITFunction.run = compile_instead
    out: list[dict] = []
    try:
        yield out
    finally:
        JITFunction.run = run
        driver._active = previous
        out.extend(rows.values())


def gdn_rows(shape: tuple[int, ...], dtype: torch.dtype, arch: int, sms: int) -> list[dict]:
    """Every kernel of one GDN fwd+bwd at ``shape`` = (B, T, H, K, V), in-kernel L2 norm."""
    from kernels.gdn import triton_chunk

    impl = triton_chunk._module_in_mode(triton_chunk, interpret=False)
    impl._sm_count = lambda device: sms
    B, T, H, K, V = shape
    x = {
        "q": torch.randn(B, T, H, K, dtype=dtype), "k": torch.randn(B, T, H, K, dtype=dtype),
        "v": torch.randn(B, T, H, V, dtype=dtype), "g": -torch.rand(B, T, H),
        "beta": torch.rand(B, T, H).to(dtype),
    }  # fmt: skip
    x = {n: t.requires_grad_() for n, t in x.items()}
    with compile_only(arch) as rows:
        o, _ = impl._chunk_gated_delta_rule(
            x["q"], x["k"], x["v"], x["g"], x["beta"], None, None, False, None, True
        )
        o.backward(torch.ones_like(o))
    return rows


def conv_norm_rows(channels: int, head_v: int, dtype: torch.dtype, arch: int) -> list[dict]:
    """The GDN layer's causal conv1d + SiLU (width 4, ``channels`` wide, document resets) and
    gated RMSNorm (rows of ``head_v``) fwd+bwd, with the block sizes the GPU path picks."""
    from kernels import conv_triton, gated_rmsnorm

    conv_triton._gpu_sizes = gated_rmsnorm._gpu_sizes = lambda x: True
    T = 256  # the grid, not the kernels, depends on T
    x = torch.randn(1, T, channels, dtype=dtype, requires_grad=True)
    w = torch.randn(channels, 4, dtype=dtype, requires_grad=True)
    cu = torch.tensor([0, 100, T], dtype=torch.int32)
    xn = torch.randn(T, head_v, dtype=dtype, requires_grad=True)
    gate = torch.randn(T, head_v, dtype=dtype, requires_grad=True)
    weight = torch.ones(head_v, dtype=dtype, requires_grad=True)
    with compile_only(arch) as rows:
        y = conv_triton.causal_conv1d_triton(x, w, cu_seqlens=cu)[0]
        y.backward(torch.ones_like(y))
        yn = gated_rmsnorm.gated_rmsnorm_triton(xn, gate, weight)
        yn.backward(torch.ones_like(yn))
    return rows


def mlp_qknorm_rows(ffn: int, qk_width: int, dtype: torch.dtype, arch: int, sms: int) -> list[dict]:
    """The MLP's SwiGLU (fc1 output ``2 * ffn`` wide) and attention's full-width QK-norm (rows of
    ``qk_width``) fwd+bwd, with the block sizes and grid the GPU path picks (``sms`` sizes the
    norm backward's grid)."""
    import types

    from kernels import rmsnorm_triton, swiglu_triton

    rmsnorm_triton._gpu_sizes = lambda x: True
    props = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda d: types.SimpleNamespace(multi_processor_count=sms)
    R = 256  # rows: the grid, not the kernels, depends on them
    x = torch.randn(R, 2 * ffn, dtype=dtype)
    q, dq = torch.randn(R, qk_width, dtype=dtype), torch.randn(R, qk_width, dtype=dtype)
    w, r = torch.ones(qk_width, dtype=dtype), torch.ones(R)
    try:
        with compile_only(arch) as rows:
            swiglu_triton.swiglu_bwd_triton(x, swiglu_triton.swiglu_fwd_triton(x))
            rmsnorm_triton.norm_fwd(q, w, rmsnorm_triton.row_reduce(q, None, None), qk_width, 1e-6)
            rmsnorm_triton.norm_bwd(q, dq, w, r, rmsnorm_triton.row_reduce(q, dq, w), qk_width)
    finally:
        torch.cuda.get_device_properties = props
    return rows


def split_columns_rows(widths: list[int], dtype: torch.dtype, arch: int) -> list[dict]:
    """The column split and its gradient merge (kernels/split_columns.py) over rows cut into
    ``widths`` (Olmo Hybrid 7B: 384,192 for the GDN projection, 96,96,192 for q, k, v)."""
    from kernels import split_columns_triton as sc

    x = torch.randn(64, sum(widths), dtype=dtype)
    with compile_only(arch) as rows:
        sc.merge_columns_triton(sc.split_columns_triton(x, widths), widths, 64, dtype, "cpu")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4,8192,30,96,192", help="B,T,H,K,V")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (H100/H200: 90)")
    ap.add_argument("--sms", type=int, default=132, help="multiprocessors (H200: 132)")
    ap.add_argument("--conv-norm", metavar="CHANNELS,V", help="also the conv1d over CHANNELS and "
                    "the gated norm over rows of V (Olmo Hybrid 7B: 11520,192)")  # fmt: skip
    ap.add_argument("--mlp-qknorm", metavar="FFN,WIDTH", help="also the SwiGLU over an FFN-wide "
                    "MLP and the QK-norm over rows of WIDTH (Olmo Hybrid 7B: 11008,3840)")  # fmt: skip
    ap.add_argument("--split-columns", metavar="W,W,...", action="append", help="also the column "
                    "split/merge for these part widths (repeatable; Olmo Hybrid 7B: 384,192 and "
                    "96,96,192)")  # fmt: skip
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shape = tuple(int(s) for s in args.shape.split(","))
    rows = gdn_rows(shape, dtype, args.arch, args.sms)
    if args.conv_norm:
        channels, head_v = (int(s) for s in args.conv_norm.split(","))
        rows += conv_norm_rows(channels, head_v, dtype, args.arch)
    if args.mlp_qknorm:
        ffn, width = (int(s) for s in args.mlp_qknorm.split(","))
        rows += mlp_qknorm_rows(ffn, width, dtype, args.arch, args.sms)
    for widths in args.split_columns or []:
        rows += split_columns_rows([int(s) for s in widths.split(",")], dtype, args.arch)
    cfg = os.environ.get("GDN_TRITON_CFG", "")
    print(f"sm_{args.arch}, shape {shape}, {args.dtype}, GDN_TRITON_CFG={cfg!r}"
          + (f", conv / norm {args.conv_norm}" if args.conv_norm else ""))  # fmt: skip
    print(f"{'kernel':26s} {'warps':>5s} {'stages':>6s} {'regs':>5s} {'spill B':>8s} {'smem B':>7s}"
          f" {'prog/SM':>8s}")  # fmt: skip
    for r in rows:
        print(f"{r['kernel']:26s} {r['warps']:5d} {r['stages']:6d} {r['reg']:5d} {r['spill']:8d} "
              f"{r['smem']:7d} {r['programs_per_sm']:8d}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(dict(shape=shape, cfg=cfg, rows=rows), indent=1))


if __name__ == "__main__":
    main()
