"""GDN / attention column splits: our Triton copy (kernels/split_columns.py) vs what the layers
did before it (torch slicing + ``.contiguous()`` forward; autograd's slice backward: zero-fill
per slice + add), at the 7B proxy's shapes, 8192 tokens, bf16. Prints a table, writes JSON.

    python benchmarks/split_columns.py [--tokens 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_hybrid.kernels.split_columns import merge_columns, split_columns  # noqa: E402

# (name, rows per token, part widths): 30 GDN heads of [q 96 | k 96 | v 192 | gate 192], then
# the conv output [q | k | v]; 30 attention KV groups of one query head [q 128 | k 128 | v 128]
SHAPES = [
    ("gdn projection -> qkv | gate", 30, (384, 192)),
    ("gdn conv output -> q | k | v", 30, (96, 96, 192)),
    ("attention qkv -> q | k | v", 30, (128, 128, 128)),
]


def _ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def measure(name: str, rows: int, widths: tuple[int, ...]) -> dict:
    """ms per call of the four ways, after checking that ours gives slicing's bits."""
    P = sum(widths)
    x = torch.randn(rows, P, device="cuda", dtype=torch.bfloat16)
    grads = [torch.randn(rows, w, device="cuda", dtype=torch.bfloat16) for w in widths]

    def torch_split():
        return [part.contiguous() for part in x.split(list(widths), dim=1)]

    def slice_backward():  # autograd's backward of the slices: a zeroed full-width grad each, summed
        out, off = None, 0
        for g, w in zip(grads, widths, strict=True):
            full = torch.zeros_like(x)
            full[:, off : off + w] = g
            out = full if out is None else out + full
            off += w
        return out

    parts = split_columns(x, widths, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(parts, x.split(list(widths), 1), strict=True))
    assert torch.equal(merge_columns(parts, widths, x.dtype, "cuda", backend="triton"), x)
    return {
        "shape": name,
        "rows": rows,
        "widths": list(widths),
        "mb": round(rows * P * 2 / 2**20, 1),
        "torch_split_ms": _ms(torch_split),
        "triton_split_ms": _ms(lambda: split_columns(x, widths, backend="triton")),
        "slice_backward_ms": _ms(slice_backward),
        "triton_merge_ms": _ms(
            lambda: merge_columns(grads, widths, x.dtype, "cuda", backend="triton")
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    rows = [measure(name, args.tokens * per, widths) for name, per, widths in SHAPES]
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, {args.tokens} tokens, bf16 (ms per call; slice backward = what autograd did)")
    print("| split | MB | torch split | ours | slice backward | our merge |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['mb']} | {r['torch_split_ms']:.3f} | {r['triton_split_ms']:.3f} "
            f"| {r['slice_backward_ms']:.3f} | {r['triton_merge_ms']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": gpu, "tokens": args.tokens, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
