"""FP8 proof (issue 17): olmo_hybrid_1b on the demo corpus, bf16 vs FP8 delayed vs FP8 tensorwise.

    python benchmarks/fp8_loss_curves.py                     # one GPU, ~5-7 minutes on an H200
    python benchmarks/fp8_loss_curves.py --steps 100 --runs bf16,delayed

The demo corpus (the interpreter's standard library, megatron_hybrid/data/demo_corpus.py) is
tokenized once with a 4096-piece sentencepiece BPE, exactly as ``megatron-hybrid-demo`` does;
then each run trains the olmo_hybrid_1b trunk (d 2048, 16 blocks, G-G-G-*- x 4; vocabulary 4096,
so 1.19 B parameters) from the same seed on the same batches: 200 steps of 8 x 1024 tokens, the
same LR schedule, te spec in bf16, the FP8 runs with ``--fp8-format hybrid --fp8-recipe
delayed|tensorwise``. Each run is its own trainer process (``python -m megatron_hybrid.train``).

Writes ``fp8_loss_curves.json`` (per-step losses and grad norms, the commands, the gaps) and
``fp8_loss_curves.png`` (the three curves and FP8 - bf16) under ``$OUT`` (else
benchmarks/results/), and prints the final-loss gaps last: the loss of the last step and the mean
of the last 20 steps, relative to bf16 (the issue's bar: within 1%).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSS_RE = re.compile(
    r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.E+-]+|NAN|INF) \|.*?grad norm: ([0-9.a-z]+) \|"
)
RUNS = {
    "bf16": [],
    "delayed": ["--fp8-format", "hybrid", "--fp8-recipe", "delayed"],
    "tensorwise": ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"],
    "blockwise": ["--fp8-format", "hybrid", "--fp8-recipe", "blockwise"],
}


def prepare_corpus(work: Path, vocab: int) -> tuple[str, str]:
    """The demo's corpus, tokenizer and indexed dataset (reused if already there)."""
    from megatron_hybrid.data.demo_corpus import build_stdlib_corpus
    from megatron_hybrid.data.preprocess import preprocess
    from megatron_hybrid.data.tokenizer_training import train_sentencepiece

    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "stdlib.jsonl"
    info = build_stdlib_corpus(str(corpus))
    print(f"corpus: {info['documents']} files, {info['bytes'] / 1e6:.1f} MB", flush=True)
    tok = train_sentencepiece([str(corpus)], str(work / "tokenizer"), vocab_size=vocab)
    summary = preprocess(
        [str(corpus)],
        str(work / "stdlib"),
        "SentencePieceTokenizer",
        tok,
        workers=max(1, min(8, os.cpu_count() or 1)),
        append_eod=True,
        progress=False,
    )
    print(f"preprocessed: {summary.tokens:,} tokens", flush=True)
    return summary.outputs[0], tok


def train_args(a, prefix: str, tok: str, work: Path) -> list[str]:
    return [
        "--preset", a.preset, "--spec", "te", "--bf16",
        "--data-path", prefix, "--split", "100,0,0",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok,
        "--seq-length", str(a.seq_length),
        "--global-batch-size", str(a.global_batch_size),
        "--micro-batch-size", str(a.micro_batch_size),
        "--train-iters", str(a.steps),
        "--lr", str(a.lr), "--min-lr", str(a.lr / 10),
        "--lr-warmup-iters", str(max(1, a.steps // 10)),
        "--seed", str(a.seed), "--log-interval", "1",
        "--data-cache-path", str(work / "index_cache"),
    ]  # fmt: skip


def run_one(name: str, args: list[str], timeout: int) -> dict:
    cmd = [sys.executable, "-m", "megatron_hybrid.train", *args, *RUNS[name]]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{ROOT}:{env.get('PYTHONPATH', '')}"
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.time() - t0
    steps = {int(m[1]): (float(m[2]), float(m[3])) for m in LOSS_RE.finditer(proc.stdout)}
    out = {
        "command": "python -m megatron_hybrid.train " + " ".join([*args, *RUNS[name]]),
        "wall_s": round(wall, 1),
        "iterations": sorted(steps),
        "loss": [steps[i][0] for i in sorted(steps)],
        "grad_norm": [steps[i][1] for i in sorted(steps)],
        "returncode": proc.returncode,
    }
    if proc.returncode != 0:
        out["error"] = (proc.stdout[-2000:] + proc.stderr[-3000:]).strip()
    fp8_plan = [ln for ln in proc.stdout.splitlines() if "FP8 share" in ln]
    if fp8_plan:
        out["fp8_share"] = fp8_plan[0].strip()
    print(
        f"{name}: {len(steps)} steps in {wall:.0f} s, final loss "
        f"{out['loss'][-1] if out['loss'] else float('nan'):.4f} (rc {proc.returncode})",
        flush=True,
    )
    return out


def gaps(results: dict, window: int = 20) -> dict:
    base = results.get("bf16")
    if not base or not base["loss"]:
        return {}
    out = {}
    b_last, b_mean = base["loss"][-1], sum(base["loss"][-window:]) / len(base["loss"][-window:])
    for name, r in results.items():
        if name == "bf16" or not r["loss"] or len(r["loss"]) != len(base["loss"]):
            continue
        last, mean = r["loss"][-1], sum(r["loss"][-window:]) / len(r["loss"][-window:])
        out[name] = {
            "final_loss": last,
            "final_loss_gap_rel": last / b_last - 1,
            f"last{window}_mean_loss": mean,
            f"last{window}_mean_gap_rel": mean / b_mean - 1,
        }
    return out


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dx) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[3, 1.3])
    base = results.get("bf16")
    for name, r in results.items():
        if r["loss"]:
            ax.plot(r["iterations"], r["loss"], label=name if name == "bf16" else f"FP8 {name}")
            if base and name != "bf16" and len(r["loss"]) == len(base["loss"]):
                diff = [x - y for x, y in zip(r["loss"], base["loss"], strict=True)]
                dx.plot(r["iterations"], diff, label=f"FP8 {name} - bf16")
    ax.set_ylabel("training loss")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)  # the run description is long
    ax.legend()
    ax.grid(alpha=0.3)
    dx.axhline(0, color="k", lw=0.5)
    dx.set_xlabel("iteration")
    dx.set_ylabel("loss - bf16")
    dx.legend()
    dx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="bf16,delayed,tensorwise", help=f"of {', '.join(RUNS)}")
    ap.add_argument("--preset", default="olmo_hybrid_1b")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--global-batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--work", default="/tmp/fp8_loss_curves", help="corpus/tokenizer/index dir")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per training run")
    a = ap.parse_args(argv)
    out_dir = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    t0 = time.time()
    prefix, tok = prepare_corpus(work, a.vocab)
    args = train_args(a, prefix, tok, work)
    results = {}
    for name in a.runs.split(","):
        results[name] = run_one(name, args, a.timeout)
    g = gaps(results)
    record = {
        "what": f"{a.preset} on the demo corpus, {a.steps} steps of {a.global_batch_size} x "
        f"{a.seq_length} tokens, same seed and data; te spec bf16 vs FP8 (hybrid format)",
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
        "gaps": g,
        "runs": results,
        "wall_s": round(time.time() - t0),
    }
    try:
        import torch

        record["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        pass
    (out_dir / "fp8_loss_curves.json").write_text(json.dumps(record, indent=1))
    plot(results, out_dir / "fp8_loss_curves.png", record["what"])
    print(f"written: {out_dir / 'fp8_loss_curves.json'}, {out_dir / 'fp8_loss_curves.png'}")
    print("| run | final loss | gap vs bf16 | mean of last 20 | gap vs bf16 |")
    print("|---|---|---|---|---|")
    if "bf16" in results and results["bf16"]["loss"]:
        b = results["bf16"]["loss"]
        print(f"| bf16 | {b[-1]:.4f} | - | {sum(b[-20:]) / len(b[-20:]):.4f} | - |")
    for name, x in g.items():
        print(
            f"| FP8 {name} | {x['final_loss']:.4f} | {100 * x['final_loss_gap_rel']:+.2f}% | "
            f"{x['last20_mean_loss']:.4f} | {100 * x['last20_mean_gap_rel']:+.2f}% |"
        )
    failed = [n for n, r in results.items() if r["returncode"] != 0]
    if failed:
        for n in failed:
            print(f"\n{n} failed:\n{results[n]['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
