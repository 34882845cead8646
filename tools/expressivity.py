"""Expressivity suite: tasks x architectures x seeds, trained by our trainer, tables + plot.

    # the real grid on one GPU (docs/science.md): 4 tasks x 4 architectures x 3 seeds
    python tools/expressivity.py --out runs/expressivity --device cuda --jobs 12
    # CPU toy (what the tests run): tiny models, a few steps
    python tools/expressivity.py --out /tmp/expr --toy --tasks parity --archs transformer gdn_beta02 --seeds 1

Writes <out>/expressivity.md, .json and .png; finished cells are kept in <out>/cells/ and
skipped when the same command is run again; cells stopped by --time-limit save a checkpoint
(<out>/cells/<cell>.ckpt) and resume from it (an interrupted grid loses at most a step per cell).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megatron_hybrid.science import expressivity as ex
    from megatron_hybrid.science.architectures import architectures

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (resumes what is there)")
    p.add_argument("--toy", action="store_true", help="tiny CPU sizes and lengths (tests)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="cuda: refuse to run without a GPU; cpu: hide GPUs from the workers",
    )
    p.add_argument(
        "--tasks", nargs="+", default=list(ex.DEFAULT_TASKS), help="of " + ", ".join(ex.REAL_TASKS)
    )
    p.add_argument(
        "--archs", nargs="+", default=list(architectures()), help="of " + ", ".join(architectures())
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell (1..N)")
    p.add_argument("--train-iters", type=int, default=None, help="steps per run (real 1500, toy 4)")
    p.add_argument(
        "--global-batch-size", type=int, default=None, help="examples per step (real 64, toy 8)"
    )
    p.add_argument("--lr", type=float, default=None, help="peak LR (real 1e-3, toy 3e-3)")
    p.add_argument(
        "--eval-examples",
        type=int,
        default=None,
        help="test examples per length (real 512, toy 16)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="cells run side by side as subprocesses (0 = one after another in this process). "
        "Small models leave a GPU mostly idle: 8-12 on one H200 (each takes a CPU core)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds: start no cell that would end later; running ones save and stop then "
        "(within STOP_GRACE_S = 120 s; exit status 4: the same command resumes them). 420 keeps "
        "a sitting under 9 minutes",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="trainer precision of every cell (default fp32: see GridConfig.precision)",
    )
    a = p.parse_args(argv)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no GPU visible")
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    tasks = ex.TOY_TASKS if a.toy else ex.REAL_TASKS
    unknown = [t for t in a.tasks if t not in tasks]
    bad_arch = [x for x in a.archs if x not in architectures()]
    if unknown or bad_arch:
        p.error(f"unknown tasks {unknown} / architectures {bad_arch}")
    grid = ex.GridConfig(
        tasks={t: tasks[t] for t in a.tasks},
        archs=a.archs,
        seeds=list(range(1, a.seeds + 1)),
        shape=ex.TOY_SHAPE if a.toy else ex.ModelShape(),
        train_iters=a.train_iters or (4 if a.toy else 1500),
        global_batch_size=a.global_batch_size or (8 if a.toy else 64),
        lr=a.lr or (3e-3 if a.toy else 1e-3),
        warmup_iters=1 if a.toy else 100,
        eval_examples=a.eval_examples or (16 if a.toy else 512),
        eval_batch_size=16 if a.toy else 64,
        precision=a.precision,
    )
    doc = ex.run_grid(grid, a.out, jobs=a.jobs, time_limit=a.time_limit)
    print(open(os.path.join(a.out, "expressivity.md")).read())
    print(f"[expressivity] wrote {a.out}/expressivity.{{md,json,png}} ({len(doc['cells'])} cells)")
    return 0 if not doc["pending"] else 4


if __name__ == "__main__":
    sys.exit(main())
