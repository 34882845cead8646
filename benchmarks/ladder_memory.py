"""Scaling-ladder rungs at their automatic micro-batch: measured GPU memory against the estimate
that chose it, and throughput. One GPU.

    python benchmarks/ladder_memory.py --out runs/ladder_mem                 # default ladder's r4, r5
    python benchmarks/ladder_memory.py --out runs/ladder_mem --rungs hybrid_r5 --steps 40
    python benchmarks/ladder_memory.py --out /tmp/lm --toy --rung-memory-gib 16  # CPU smoke run

`tools/scaling_ladder.py` picks each rung's micro-batch as the largest of 64, 32, 16, ... whose
memory estimate, padded by the factor and constant measured on an H100 (science/ladder.py),
fits the rung's share of the card. The pad was calibrated on 20-56 M rungs; this checks it on
the rungs a user runs last and biggest (the default ladder's 768x12 and 1024x12, ~100-190 M):
each runs ``--steps`` steps of the real rung command (its corpus, widths, LR, batch) in its own
process and reports the trainer's one-time ``memory (MB)`` line. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MEM = re.compile(r"memory \(MB\) \| allocated: ([\d.]+) \| max allocated: ([\d.]+) \| "
                 r"reserved: ([\d.]+) \| max reserved: ([\d.]+)")  # fmt: skip
ITER = re.compile(r"iteration +(\d+)/.*per iteration \(ms\): ([\d.]+) \| "
                  r"throughput per GPU \(TFLOP/s/GPU\): ([\d.]+)")  # fmt: skip


def card_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def measure(cfg, rung, data, steps: int, out: str) -> dict:
    """Run the rung's own command for ``steps`` steps; the memory line and the last timing."""
    from megatron_hybrid.science import ladder as L

    mbs = L.micro_batch_for(cfg, rung, data)
    save = os.path.join(out, "runs", rung.name)
    shutil.rmtree(save, ignore_errors=True)  # a fresh start each time: a resume would skip steps
    argv = L.rung_argv(cfg, rung, data, steps, save, micro_batch=mbs)
    # later flags win: log every few steps (the memory line comes with the first log line),
    # no checkpoints and no evaluation on the way (a timing run, not a rung)
    argv += ["--log-interval", str(max(1, steps // 4)), "--save-interval", str(10 * steps),
             "--eval-iters", "1"]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_hybrid.train", *argv],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    with open(os.path.join(out, rung.name + ".log"), "w") as f:
        f.write(text)
    row = {"rung": rung.name, "micro_batch": mbs, "rc": proc.returncode,
           "estimate_gib": round(L.rung_estimate_gib(cfg, rung, data, mbs), 2),
           "seconds": round(time.time() - t0, 1)}  # fmt: skip
    row["padded_gib"] = round(L.padded_need_gib(row["estimate_gib"]), 2)
    m = MEM.search(text)
    if m:
        alloc, max_alloc, res, max_res = (float(x) / 1024 for x in m.groups())
        row.update(max_allocated_gib=round(max_alloc, 2), max_reserved_gib=round(max_res, 2))
        row["allocated_over_estimate"] = round(max_alloc / row["estimate_gib"], 3)
    its = ITER.findall(text)
    if len(its) >= 2:  # the first line holds the warm-up (compile, autotune)
        row.update(ms_per_step=float(its[-1][1]), tflops=float(its[-1][2]))
    if proc.returncode != 0:
        row["error"] = [ln for ln in text.splitlines() if ln.strip()][-1][:300]
    return row


def _cell(row: dict):
    return lambda key, fmt: format(row[key], fmt) if key in row else "-"


def main(argv=None) -> int:
    from megatron_hybrid.science import ladder as L

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="work folder (its corpus/ is built once, reused)")
    p.add_argument("--rungs", default="hybrid_r5,transformer_r5,hybrid_r4,transformer_r4")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rung-memory-gib", type=float, default=None,
                   help="the rung's share of the card (default: the whole card)")  # fmt: skip
    p.add_argument("--corpus-mb", type=float, default=400.0,
                   help="demo corpus size; memory and speed do not depend on it (20 builds fast)")  # fmt: skip
    p.add_argument("--toy", action="store_true", help="tiny rungs on a tiny corpus (CPU)")
    p.add_argument("--json", default=None, help="default <out>/ladder_memory.json")
    a = p.parse_args(argv)
    memory = a.rung_memory_gib or card_gib() or 16.0
    os.makedirs(a.out, exist_ok=True)
    if a.toy:
        cfg = L.LadderConfig(sizes=[(32, 4), (48, 4)], seq_length=64, global_batch_size=8,
                             eval_iters=1, head_dim=16, gdn_head_k_dim=16, gdn_head_v_dim=32,
                             rung_memory_gib=memory)  # fmt: skip
        data = L.prepare_demo_corpus(a.out, 0.3, 512, site_packages=False)
        data["split"] = "90,10,0"
        names = [r.name for r in cfg.rungs()] if a.rungs == p.get_default("rungs") else None
    else:
        cfg = L.LadderConfig(rung_memory_gib=memory)
        data = L.prepare_demo_corpus(a.out, a.corpus_mb, 8192, site_packages=True)
        names = None
    wanted = names or a.rungs.split(",")
    rungs = {r.name: r for r in cfg.rungs()}
    unknown = [n for n in wanted if n not in rungs]
    if unknown:
        p.error(f"no rung {unknown}; the ladder has {', '.join(rungs)}")
    rows = [measure(cfg, rungs[n], data, a.steps, a.out) for n in wanted]
    hdr = (f"{'rung':16s} {'mbs':>4s} {'estimate':>9s} {'padded':>7s} {'max alloc':>10s} "
           f"{'max resv':>9s} {'alloc/est':>9s} {'ms/step':>8s} {'TFLOP/s':>8s}")  # fmt: skip
    print(f"rung memory share {memory:.1f} GiB; memory in GiB")
    print(hdr)
    for r in rows:
        g = _cell(r)
        print(f"{r['rung']:16s} {r['micro_batch']:4d} {r['estimate_gib']:9.2f} "
              f"{r['padded_gib']:7.2f} {g('max_allocated_gib', '10.2f')} "
              f"{g('max_reserved_gib', '9.2f')} {g('allocated_over_estimate', '9.3f')} "
              f"{g('ms_per_step', '8.1f')} {g('tflops', '8.1f')}"
              + (f"  FAILED: {r['error']}" if r["rc"] else ""))  # fmt: skip
    path = a.json or os.path.join(a.out, "ladder_memory.json")
    with open(path, "w") as f:
        json.dump({"rung_memory_gib": memory, "steps": a.steps, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
