"""bf16 error of our GDN kernels and fla's, on the CPU, under the Triton interpreter made to round
like the GPU.

The question "is our bf16 output at least as accurate as fla's?" is otherwise only answerable on
the GPU (``benchmarks/gdn_kernels.py --errors-only``). Stock Triton 3.6's interpreter cannot
answer it: it converts float32 to bfloat16 by truncation (the GPU rounds to nearest even), and it
stores bfloat16 as raw uint16 bits, so arithmetic and ``tl.dot`` on bfloat16 tiles multiply bit
patterns (our kernels work around that in ``_dot``; fla's do not). This script patches the
interpreter, in this process only, so that

* float32 -> bfloat16 casts round to nearest even (through torch);
* elementwise arithmetic and unary maths on bfloat16 tiles compute in float32 and round the
  result to bfloat16 (what the compiled code does);
* ``tl.dot`` multiplies the operands' values with float32 accumulation;
* ``for i in range(n)`` in fla's kernels yields Triton scalars (fla calls ``i.to(...)``), and
  ``__index__`` accepts the interpreter's one-element arrays;
* autotuning picks each kernel's first config (no timer on the CPU).

What remains different from the GPU: accumulation order inside ``tl.dot`` and reductions, and
the UT-inverse products in exact float32 instead of TF32 (a 0.05% effect on our o error). The
emulation reproduced the H200's picture for the previous numerics: ours 4.445e-3 vs fla
4.444e-3 rel L2 (GPU: 4.40e-3 vs 4.37e-3; see docs/kernels.md). fla's backward under the
emulation gives a non-finite dg (not investigated: fla is not ours and its GPU backward is refused
on this Triton anyway), so ``--grads`` reports fla's dg as such.

    TRITON_INTERPRET=1 python benchmarks/gdn_emulated_errors.py --fla-path /tmp/fla_site \\
        --shape 1,1024,4,96,192 --seeds 1,2 [--lens 1,100,0,37,...] [--grads] [--out errors.json]

Compare settings with ``GDN_TRITON_CFG`` (e.g. ``tinv_f32=0``). ~40 s per seed at the default
shape on two cores (both implementations).
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.runtime.autotuner as autotuner  # noqa: E402
from triton.runtime import interpreter as interp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16).reshape(np.shape(x))


def _scalar_tensor(i: int):
    return tl.core.tensor(interp.TensorHandle(np.array([i], dtype=np.int32), tl.int32), tl.int32)


def _tensor_range(*args):
    """``range`` for fla's kernels under the interpreter: yields Triton scalars, as compiled."""
    ints = [int(a.handle.data.reshape(-1)[0]) if hasattr(a, "handle") else int(a) for a in args]
    for i in builtins.range(*ints):
        yield _scalar_tensor(i)


def emulate_gpu_rounding() -> None:
    """Patch Triton's interpreter (this process) to round bfloat16 as the GPU does; see above."""
    if not triton.__version__.startswith("3.6"):
        print(f"warning: written against Triton 3.6's interpreter, this is {triton.__version__}")
    B = interp.InterpreterBuilder
    cast, binary, unary, patch_tensor = (
        B.cast_impl,
        B.binary_op,
        B.unary_op,
        interp._patch_lang_tensor,
    )

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if d == tl.bfloat16 and s in (tl.float32, tl.float16):
            return interp.TensorHandle(_f32_to_bf16(src.data.astype(np.float32)), d)
        if s == tl.bfloat16 and d == tl.float16:
            return interp.TensorHandle(_bf16_to_f32(src.data).astype(np.float16), d)
        return cast(self, src, dst_type)

    def binary_op(self, lhs, rhs, op):
        if lhs.dtype.scalar == tl.bfloat16 and rhs.dtype.scalar == tl.bfloat16:
            out = op(_bf16_to_f32(lhs.data), _bf16_to_f32(rhs.data))
            if out.dtype == np.bool_:
                return interp.TensorHandle(out, tl.int1)
            return interp.TensorHandle(_f32_to_bf16(out), tl.bfloat16)
        return binary(self, lhs, rhs, op)

    def unary_op(self, arg, op):
        if arg.dtype.scalar == tl.bfloat16:
            return interp.TensorHandle(_f32_to_bf16(op(_bf16_to_f32(arg.data))), tl.bfloat16)
        return unary(self, arg, op)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def value(h):
            return (
                _bf16_to_f32(h.data) if h.dtype.scalar == tl.bfloat16 else h.data.astype(np.float32)
            )

        out = np.matmul(value(a), value(b), dtype=np.float32) + d.data
        return interp.TensorHandle(out, d.dtype.scalar)

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    B.cast_impl, B.binary_op, B.unary_op, B.create_dot = cast_impl, binary_op, unary_op, create_dot
    for name in ("create_fp_ext", "create_fp_trunc"):
        setattr(B, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))
    B.create_fp_to_fp = lambda self, src, dst_type, rounding_mode: self.cast_impl(src, dst_type)
    interp._patch_lang_tensor = patch_lang_tensor
    autotuner.Autotuner._bench = lambda self, *a, config, **kw: [0.0, 0.0, 0.0]


def load_fla(path: str | None):
    if path:
        sys.path.append(path)
    try:
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdn
    except ImportError as e:
        print(f"fla not available ({e}); ours only")
        return None
    fla_chunk_o.TRITON_ABOVE_3_7_1 = True  # the guard is about the compiled GPU code, not this
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("fla.ops"):
            mod.range = _tensor_range
    return fla_gdn


def make_inputs(B, T, H, K, V, seed):
    """The distribution of benchmarks/gdn_kernels.py: unit normals, Olmo-like decays."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    beta = torch.sigmoid(randn(B, T, H))
    g = -torch.linspace(1.0, 16.0, H) * F.softplus(0.5 * randn(B, T, H) - 4.0)
    return dict(q=q, k=k, v=v, g=g, beta=beta)


def run(fn, inputs, do=None, cu_seqlens=None) -> dict:
    inputs = {n: t.detach().clone().requires_grad_(do is not None) for n, t in inputs.items()}
    o = fn(**inputs, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)[0]
    out = {"o": o.detach().float()}
    if do is not None:
        o.backward(do.to(o.dtype))
        out.update({f"d{n}": t.grad.float() for n, t in inputs.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1,1024,4,96,192", help="B,T,H,K,V")
    ap.add_argument("--lens", help="packed sequence lengths (B = 1, T = their sum): 1,100,0,37")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--grads", action="store_true", help="also every gradient (vs same inputs)")
    ap.add_argument("--fla-path", help="folder holding the fla package (kept off the default path)")
    ap.add_argument("--out", help="JSON file")
    args = ap.parse_args()
    emulate_gpu_rounding()
    from kernels.gdn.chunk_torch import chunk_gated_delta_rule_torch
    from kernels.gdn.triton_chunk import chunk_gated_delta_rule_triton

    impls = {"ours": chunk_gated_delta_rule_triton}
    fla_gdn = load_fla(args.fla_path)
    if fla_gdn is not None:
        impls["fla 0.6"] = fla_gdn
    B, T, H, K, V = (int(x) for x in args.shape.split(","))
    cu = None
    if args.lens:
        lens = [int(x) for x in args.lens.split(",")]
        B, T, cu = 1, sum(lens), torch.tensor([0] + lens).cumsum(0)
    cfg = os.environ.get("GDN_TRITON_CFG", "")
    packed = f" packed {args.lens}" if cu is not None else ""
    print(f"B={B} T={T}{packed} H={H} K={K} V={V}, bf16, GDN_TRITON_CFG={cfg!r}; rel L2 error vs the "
          "float32 chunked reference on the fp32 inputs / on the same bf16-rounded inputs")  # fmt: skip
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        x32 = make_inputs(B, T, H, K, V, seed)
        x16 = {n: (t if n == "g" else t.to(torch.bfloat16)) for n, t in x32.items()}
        do = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(seed + 100))
        with torch.no_grad():
            ref32 = run(chunk_gated_delta_rule_torch, x32, cu_seqlens=cu)["o"]
        ref = run(chunk_gated_delta_rule_torch, {n: t.float() for n, t in x16.items()},
                  do if args.grads else None, cu)  # fmt: skip
        for name, fn in impls.items():
            got = run(fn, x16, do if args.grads else None, cu)
            err = {"o_vs_fp32_inputs": ((got["o"] - ref32).norm() / ref32.norm()).item()}
            err.update({k: ((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref})
            rows.append(dict(seed=seed, impl=name, cfg=cfg, shape=[B, T, H, K, V],
                             lens=args.lens, errors=err))  # fmt: skip
            print(f"seed {seed} {name:8s} " + "  ".join(f"{k} {v:.3e}" for k, v in err.items()),
                  flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
