"""The expressivity grid: tasks x architectures x seeds, each cell one run of our trainer.

A cell is a normal ``megatron_hybrid.train`` command line (``--synthetic-task``,
``--hybrid-layer-pattern``, ``--no-gdn-neg-eigval``, model overrides; recorded in its result
so any cell can be rerun by hand), run in-process (``jobs=0``) or in ``jobs`` worker
subprocesses that share the GPU(s) (small models leave a GPU mostly idle, so several cells
run side by side). Each finished cell writes ``<out>/cells/<cell>.json``; a rerun skips cells
whose result is there for the same settings, so an interrupted grid resumes.

Outputs (``expressivity_report``): ``expressivity.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from megatron_hybrid.parallel.child_env import without_rendezvous
from megatron_hybrid.science.architectures import (
    ModelShape,
    architectures,
    matched_intermediate,
)
from megatron_hybrid.science.expressivity_report import write_outputs
from megatron_hybrid.science.grid_config import GridConfig, TaskSpec

# The real grid (one H200, docs/science.md): lengths trained on, then 2x, 4x, 8x longer.
REAL_TASKS = {
    "state_recall": TaskSpec("state_recall", 16, 0, (16, 32, 64, 128), (("state_recall_bits", 16),)),
    # the spec's task with an addressed memory and all five names queried, trained on 0..2
    # swaps (docs/science.md: the spec form stayed at its no-lookup shortcut for every
    # architecture at 6000 steps; on CPU this form was learned from 0..2 swaps in ~600 steps,
    # not from 0..4 in 1500 nor from 0..16 in 1500)
    "state_recall_addr": TaskSpec(
        "state_recall", 2, 0, (2, 4, 8, 16),
        (("state_recall_bits", 16), ("state_recall_addressed", 1), ("state_recall_queries", 5)),
    ),
    "s5": TaskSpec("s5", 32, 1, (32, 64, 128, 256)),
    "a5": TaskSpec("a5", 32, 1, (32, 64, 128, 256)),
    "parity": TaskSpec("parity", 64, 1, (64, 128, 256, 512)),
    "mqar": TaskSpec("mqar", 16, 1, (16, 32, 64), (("mqar_num_keys", 64), ("mqar_num_values", 64))),
}  # fmt: skip
DEFAULT_TASKS = ("state_recall", "s5", "parity", "mqar")

# CPU toy (tests): tiny everything, a handful of steps.
TOY_TASKS = {
    "state_recall": TaskSpec("state_recall", 2, 0, (2, 4), (("state_recall_bits", 6),)),
    "state_recall_addr": TaskSpec(
        "state_recall",
        2,
        0,
        (2, 4),
        (("state_recall_bits", 6), ("state_recall_addressed", 1), ("state_recall_queries", 5)),
    ),
    "s5": TaskSpec("s5", 4, 1, (4, 8)),
    "a5": TaskSpec("a5", 4, 1, (4, 8)),
    "parity": TaskSpec("parity", 6, 1, (6, 12)),
    "mqar": TaskSpec("mqar", 3, 1, (3, 6), (("mqar_num_keys", 8), ("mqar_num_values", 8))),
}
TOY_SHAPE = ModelShape(
    hidden_size=32, depth=4, attention_heads=2, gdn_heads=1, gdn_head_k_dim=16,
    gdn_head_v_dim=32, mlp_hidden=64,
)  # fmt: skip


def cell_name(task: str, arch: str, seed: int) -> str:
    return f"{task}__{arch}__s{seed}"


def cell_argv(grid: GridConfig, spec: TaskSpec, arch_name: str, seed: int,
              intermediate: int) -> list[str]:  # fmt: skip
    """The ``megatron_hybrid.train`` command line of one cell."""
    arch = architectures(grid.shape.depth)[arch_name]
    s, t = grid.shape, grid.train_iters
    argv = [
        "--preset", "tiny",
        "--hybrid-layer-pattern", arch.pattern,
        "--synthetic-task", spec.task,
        "--synthetic-train-length", str(spec.train_length),
        "--synthetic-train-min-length", str(spec.train_min_length),
        "--synthetic-eval-lengths", *map(str, spec.eval_lengths),
        "--synthetic-eval-examples", str(grid.eval_examples),
        "--seq-length", str(spec.seq_length()),
        "--global-batch-size", str(grid.global_batch_size),
        "--micro-batch-size", str(grid.global_batch_size),
        "--train-iters", str(t),
        "--lr", str(grid.lr),
        "--min-lr", str(grid.lr / 10),
        "--lr-warmup-iters", str(min(grid.warmup_iters, t - 1)),
        "--eval-interval", str(t),
        "--eval-iters", "1",
        "--log-interval", str(max(1, t // 10)),
        "--seed", str(seed),
        f"--{grid.precision}",
        f"model.hidden_size={s.hidden_size}",
        f"model.num_attention_heads={s.attention_heads}",
        f"model.num_key_value_heads={s.attention_heads}",
        f"model.gdn_num_heads={s.gdn_heads}",
        f"model.gdn_head_k_dim={s.gdn_head_k_dim}",
        f"model.gdn_head_v_dim={s.gdn_head_v_dim}",
        f"model.intermediate_size={intermediate}",
        f"model.rope_theta={s.rope_theta}",
        "model.max_position_embeddings=65536",
        f"synthetic.eval_batch_size={grid.eval_batch_size}",
    ]  # fmt: skip
    argv += [f"synthetic.{k}={v}" for k, v in spec.options]
    if not arch.neg_eigval:
        argv.append("--no-gdn-neg-eigval")
    return argv


def plan(grid: GridConfig) -> list[dict]:
    """Every cell of the grid as a JSON-able dict (its command line included)."""
    from megatron_hybrid.data.synthetic import SyntheticConfig, task_vocab_size
    from megatron_hybrid.data.tokenizers import padded_vocab_size

    archs = architectures(grid.shape.depth)
    cells = []
    for tname, spec in grid.tasks.items():
        vocab = padded_vocab_size(
            task_vocab_size(SyntheticConfig(task=spec.task, **dict(spec.options))), 128, 1
        )
        widths = matched_intermediate(grid.shape, archs, vocab)
        for arch in grid.archs:
            for seed in grid.seeds:
                cells.append(
                    {
                        "name": cell_name(tname, arch, seed),
                        "task": tname,
                        "arch": arch,
                        "seed": seed,
                        "argv": cell_argv(grid, spec, arch, seed, widths[arch]),
                    }
                )
    return cells


def run_cell(cell: dict, log_path: str, ckpt_dir: str | None = None,
             deadline: float | None = None) -> dict | None:  # fmt: skip
    """Train and evaluate one cell in this process; returns its result dict, or None when it
    stopped early (``deadline``, or SIGTERM/SIGUSR1: the trainer saves into ``ckpt_dir`` first,
    and the next call with the same ``ckpt_dir`` resumes from there).

    ``ckpt_dir`` is added as --save/--load at run time only: the recorded command line (the
    cell's identity when a rerun looks for finished cells) stays the same with or without it."""
    import shutil
    import threading

    from megatron_hybrid.parallel import state
    from megatron_hybrid.training.cli import parse
    from megatron_hybrid.training.loop import Trainer

    argv = list(cell["argv"]) + (["--save", ckpt_dir, "--load", ckpt_dir] if ckpt_dir else [])
    run, _ = parse(argv)
    resuming = bool(ckpt_dir) and os.path.isdir(ckpt_dir)
    spent_path = os.path.join(ckpt_dir, "seconds_before.txt") if ckpt_dir else None
    spent = float(open(spent_path).read()) if resuming and os.path.isfile(spent_path) else 0.0
    t0 = time.time()
    losses = []
    timer = None
    with open(log_path, "a" if resuming else "w") as logf:

        def log(line: str) -> None:
            logf.write(line + "\n")
            logf.flush()
            if "| lm loss: " in line:
                losses.append(float(line.split("| lm loss: ")[1].split(" ")[0]))

        try:
            trainer = Trainer(run, log=log).setup()
            if deadline is not None:  # the trainer saves at the next step boundary and returns
                timer = threading.Timer(
                    max(0.0, deadline - time.time()),
                    lambda: setattr(trainer, "stop_signal", "time limit"),
                )
                timer.daemon = True
                timer.start()
            trainer.train()
            finished = trainer.iteration >= run.train.train_iters
            metrics = trainer.task_metrics
            params = trainer.run.model.num_params()
            device = str(trainer.device)
        finally:
            if timer is not None:
                timer.cancel()
            state.destroy()
    seconds = spent + time.time() - t0
    if not finished:
        if spent_path and os.path.isdir(ckpt_dir):
            with open(spent_path, "w") as f:
                f.write(f"{seconds:.1f}")
        return None
    if ckpt_dir:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the result is all a finished cell keeps
    return {
        **cell,
        "params": params,
        "device": device,
        "final_train_loss": losses[-1] if losses else None,
        "metrics": {str(k): v for k, v in metrics.items()},
        "seconds": round(seconds, 1),
    }


def _worker_env(gpu: int | None) -> dict:
    env = without_rendezvous(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


STOP_GRACE_S = 120.0
"""How long past the time limit the grid waits for its workers to save and stop."""


def run_grid(grid: GridConfig, out: str, jobs: int = 0, log=print,
             time_limit: float | None = None) -> dict:  # fmt: skip
    """Run (or resume) every cell, then write the tables and the plot; returns the summary.
    ``time_limit`` (seconds): start no cell that the mean cell time says would end past it, and
    at it, running cells save a checkpoint (``<cells>/<cell>.ckpt``) and stop; the tables then
    cover the finished cells and ``doc["pending"]`` counts the rest. The same command again
    resumes the stopped cells from their checkpoints and runs the others."""
    cells_dir = os.path.join(out, "cells")
    os.makedirs(cells_dir, exist_ok=True)
    todo, results = [], {}
    for cell in plan(grid):
        path = os.path.join(cells_dir, cell["name"] + ".json")
        if os.path.isfile(path):
            with open(path) as f:
                done = json.load(f)
            if done.get("argv") == cell["argv"]:
                results[cell["name"]] = done
                continue
        todo.append(cell)
    log(f"[expressivity] {len(results)} cells done, {len(todo)} to run (jobs={jobs})")
    t0 = time.time()
    deadline = t0 + time_limit if time_limit else None
    durations: list[float] = []

    def may_start() -> bool:
        if deadline is None:
            return True
        guess = float(np.mean(durations)) if durations else 0.0
        return time.time() + guess < deadline

    stopped: list[str] = []
    if jobs <= 0:
        for i, cell in enumerate(todo):
            if not may_start():
                break
            ckpt = _ckpt_dir(cells_dir, cell["name"])
            res = run_cell(cell, os.path.join(cells_dir, cell["name"] + ".log"), ckpt, deadline)
            if res is None:
                stopped.append(cell["name"])
                break
            _save(cells_dir, res)
            results[cell["name"]] = res
            durations.append(res["seconds"])
            log(_progress(i + 1, len(todo), res, t0))
    else:
        import torch

        n_gpus = torch.cuda.device_count()
        running: list[tuple[subprocess.Popen, dict]] = []
        queue, finished = list(todo), 0
        while queue or running:
            if deadline is not None and time.time() > deadline + STOP_GRACE_S:
                # the workers stop themselves at the deadline (saving); these did not in time
                for proc, cell in running:
                    proc.kill()
                    proc.wait()
                    stopped.append(cell["name"])
                log(f"[expressivity] killed {len(running)} cells that did not stop in time")
                break
            while queue and len(running) < jobs and may_start():
                cell = queue.pop(0)
                spec_path = os.path.join(cells_dir, cell["name"] + ".cell.json")
                with open(spec_path, "w") as f:
                    json.dump({**cell, "deadline": deadline}, f)
                gpu = (finished + len(running)) % n_gpus if n_gpus else None
                proc = subprocess.Popen(
                    [sys.executable, "-m", "megatron_hybrid.science.expressivity", spec_path],
                    env=_worker_env(gpu),
                    stdout=subprocess.DEVNULL,
                    stderr=open(os.path.join(cells_dir, cell["name"] + ".err"), "w"),
                )
                running.append((proc, cell))
            if not running:
                break  # nothing may start before the deadline
            time.sleep(0.5)
            for proc, cell in list(running):
                if proc.poll() is None:
                    continue
                running.remove((proc, cell))
                if proc.returncode == STOPPED_EXIT:
                    stopped.append(cell["name"])
                    continue
                finished += 1
                path = os.path.join(cells_dir, cell["name"] + ".json")
                if proc.returncode != 0 or not os.path.isfile(path):
                    raise RuntimeError(
                        f"cell {cell['name']} failed (exit {proc.returncode}); see "
                        f"{os.path.join(cells_dir, cell['name'] + '.err')}"
                    )
                with open(path) as f:
                    results[cell["name"]] = json.load(f)
                durations.append(results[cell["name"]]["seconds"])
                os.remove(os.path.join(cells_dir, cell["name"] + ".cell.json"))
                log(_progress(finished, len(todo), results[cell["name"]], t0))
    if stopped:
        log(f"[expressivity] time limit: {len(stopped)} cells stopped, saved: {', '.join(stopped)}")
    cells = plan(grid)
    ordered = [results[c["name"]] for c in cells if c["name"] in results]
    doc = write_outputs(grid, ordered, out, pending=len(cells) - len(ordered))
    if doc["pending"]:
        log(f"[expressivity] {doc['pending']} cells not run yet: run the same command again")
    return doc


def _progress(i: int, n: int, res: dict, t0: float) -> str:
    accs = ", ".join(f"{k}: {v['accuracy']:.3f}" for k, v in res["metrics"].items())
    return f"[expressivity] {i}/{n} {res['name']} ({res['seconds']:.0f} s, total {time.time() - t0:.0f} s) {accs}"


def _save(cells_dir: str, res: dict) -> None:
    path = os.path.join(cells_dir, res["name"] + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)


STOPPED_EXIT = 3
"""A worker's exit status when its cell stopped early, saved (time limit or signal)."""


def _worker(spec_path: str) -> int:
    """Subprocess entry: run the cell in ``spec_path`` (resuming from its checkpoint) and save
    its result next to it; STOPPED_EXIT when it stopped early, saved."""
    with open(spec_path) as f:
        spec = json.load(f)
    deadline = spec.pop("deadline", None)
    cells_dir = os.path.dirname(spec_path)
    res = run_cell(
        spec,
        os.path.join(cells_dir, spec["name"] + ".log"),
        ckpt_dir=_ckpt_dir(cells_dir, spec["name"]),
        deadline=deadline,
    )
    if res is None:
        return STOPPED_EXIT
    _save(cells_dir, res)
    return 0


def _ckpt_dir(cells_dir: str, name: str) -> str:
    return os.path.join(cells_dir, name + ".ckpt")


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
