"""Scaling ladder: transformer vs 3:1 hybrid at several sizes; loss vs FLOPs, fit, multiplier.

    # plan only: parameters, tokens, FLOPs and estimated GPU time of every rung
    python tools/scaling_ladder.py --out runs/ladder --plan
    # run (or resume) the ladder for at most 510 s, then write the report; repeat until done
    python tools/scaling_ladder.py --out runs/ladder --time-limit 510
    # the same with 4 rungs at a time on the GPU(s): small rungs leave most of a GPU idle
    python tools/scaling_ladder.py --out runs/ladder --time-limit 510 --jobs 4
    # CPU toy (what the tests run)
    python tools/scaling_ladder.py --out /tmp/ladder --toy

Without --data-path the corpus is built once under <out>/corpus from this machine's Python
sources (stdlib + installed packages; see megatron_hybrid/demo.py). Each rung checkpoints into
<out>/rungs/<rung>/ and resumes there; finished rungs are skipped. One rung per Slurm array
task: --rung INDEX (examples/slurm/scaling_ladder.sbatch), then --report-only.
Writes <out>/scaling_ladder.md, .json and .png. Exit status 4: rungs still pending (of --only's,
when given).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sizes(text: str) -> list[tuple[int, int]]:
    """'256x4,384x8' -> [(256, 4), (384, 8)] (width x blocks)."""
    out = []
    for part in text.split(","):
        d, _, n = part.strip().partition("x")
        out.append((int(d), int(n)))
    return out


def main(argv=None) -> int:
    from megatron_hybrid.science import ladder as L
    from megatron_hybrid.science.ladder_report import report

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="ladder directory (resumes what is there)")
    p.add_argument("--toy", action="store_true", help="2 tiny rungs per architecture on CPU")
    p.add_argument("--data-path", default=None, help="indexed dataset prefix (P_text_document)")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--split", default="98,2,0")
    p.add_argument(
        "--corpus-mb", type=float, default=None, help="demo corpus size (real 400, toy 0.3)"
    )
    p.add_argument(
        "--vocab", type=int, default=None, help="demo tokenizer pieces (real 8192, toy 512)"
    )
    p.add_argument("--stdlib-only", action="store_true", help="demo corpus without site-packages")
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="WIDTHxBLOCKS,... (default 256x4,384x8,512x8,768x12,1024x12)",
    )
    p.add_argument(
        "--archs", nargs="+", default=["transformer", "hybrid"], choices=["transformer", "hybrid"]
    )
    p.add_argument("--tokens-per-param", type=float, default=None, help="default 20 (toy 0.05)")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="default: per rung, the largest power of two up to 64 whose memory estimate fits "
        "--rung-memory-gib (16 without a GPU); give one to fix it, lower if a rung runs out",
    )
    p.add_argument(
        "--rung-memory-gib",
        type=float,
        default=None,
        help="GPU memory one rung may use for the automatic micro-batch (default: the card's "
        "memory over the rungs that share it, --jobs / GPUs)",
    )
    p.add_argument(
        "--lr-base",
        type=float,
        default=None,
        help="peak LR at width 256 (scaled by (256/width)^0.5)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds; the running rung saves and stops then (510 keeps a sitting under 9 min)",
    )
    p.add_argument(
        "--exit-interval",
        type=int,
        default=None,
        help="stop every rung at a multiple of this many steps (saved)",
    )
    p.add_argument(
        "--rung",
        default=None,
        help="run only this rung (index into the plan, or name like hybrid_r3)",
    )
    p.add_argument(
        "--only",
        default=None,
        help="train only these rungs (comma-separated names or indices), e.g. the ones that fit "
        "one GPU sitting; the report still fits every finished rung",
    )
    p.add_argument(
        "--report-only", action="store_true", help="no training: fit and report the finished rungs"
    )
    p.add_argument(
        "--plan", action="store_true", help="print the rungs and estimated GPU time, then exit"
    )
    p.add_argument(
        "--assumed-tflops",
        type=float,
        default=200.0,
        help="achieved TFLOP/s for --plan's time estimate (default: between the measured 165 "
        "at micro-batch 16 and ~225 at 64, 4 rungs of 7-56 M parameters side by side on one "
        "H100, 2026-12-06)",
    )
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap draws for the multiplier's interval"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="rungs trained at once, each in its own process (--rung), spread over the visible "
        "GPUs; the largest rungs start first",
    )
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error(f"--jobs {a.jobs}: at least 1")
    t0 = time.time()
    deadline = t0 + a.time_limit if a.time_limit else None

    cfg = L.LadderConfig()
    if a.toy:
        cfg = L.LadderConfig(
            sizes=[(32, 4), (48, 4)], tokens_per_param=0.05, seq_length=64, global_batch_size=8,
            micro_batch_size=8, eval_iters=2, head_dim=16, gdn_head_k_dim=16, gdn_head_v_dim=32,
            saves_per_rung=2,
        )  # fmt: skip
    for key, val in (
        ("sizes", a.sizes), ("tokens_per_param", a.tokens_per_param), ("seq_length", a.seq_length),
        ("global_batch_size", a.global_batch_size), ("micro_batch_size", a.micro_batch_size),
        ("lr_base", a.lr_base), ("exit_interval", a.exit_interval),
    ):  # fmt: skip
        if val is not None:
            setattr(cfg, key, val)
    cfg.archs = tuple(a.archs)
    cfg.rung_memory_gib = a.rung_memory_gib
    if cfg.rung_memory_gib is None and cfg.micro_batch_size is None:
        cfg.rung_memory_gib = _rung_memory_gib(a.jobs if a.rung is None else 1)
    os.makedirs(os.path.join(a.out, "rungs"), exist_ok=True)

    if a.data_path:
        if not a.tokenizer_model:
            p.error("--data-path needs --tokenizer-model (the tokenizer it was preprocessed with)")
        data = {
            "prefix": a.data_path,
            "tokenizer_type": a.tokenizer_type,
            "tokenizer_model": a.tokenizer_model,
        }
        if os.path.isfile(a.data_path + ".idx") and os.path.isfile(a.data_path + ".bin"):
            data["fingerprint"] = L.corpus_fingerprint(data)
    else:
        data = None
    try:  # refused: a rebuilt corpus that is not the recorded one, rungs of another corpus
        if data is None:
            data = L.prepare_demo_corpus(
                a.out,
                a.corpus_mb or (0.3 if a.toy else 400.0),
                a.vocab or (512 if a.toy else 8192),
                site_packages=not (a.toy or a.stdlib_only),
            )
        data["split"] = "90,10,0" if a.toy and not a.data_path else a.split
        plans = [L.rung_plan(cfg, r, data, a.out) for r in cfg.rungs()]
        L.check_finished_rungs(plans, a.out)
    except RuntimeError as e:
        print(f"[ladder] error: {e}", file=sys.stderr)
        return 2
    selected = plans
    if a.only:
        wanted = [w for w in a.only.split(",") if w]
        known = {str(i) for i in range(len(plans))} | {pl["name"] for pl in plans}
        if not wanted or set(wanted) - known:
            p.error(
                f"--only {a.only}: no such rung {sorted(set(wanted) - known)} "
                f"(0..{len(plans) - 1} or {', '.join(pl['name'] for pl in plans)})"
            )
        selected = [pl for i, pl in enumerate(plans) if str(i) in wanted or pl["name"] in wanted]

    def selected_pending() -> bool:
        return any(
            not os.path.isfile(os.path.join(a.out, "rungs", pl["name"] + ".json"))
            for pl in selected
        )

    if a.plan:
        total = 0.0
        print(
            f"{'#':>2} {'rung':<15} {'params':>9} {'tokens':>10} {'steps':>7} {'mbs':>4} {'FLOPs':>10} {'GPU h':>6}"
        )
        for i, pl in enumerate(plans):
            hours = pl["flops"] / (a.assumed_tflops * 1e12) / 3600
            total += hours
            print(
                f"{i:>2} {pl['name']:<15} {pl['params'] / 1e6:>8.1f}M {pl['tokens'] / 1e6:>9.1f}M "
                f"{pl['train_iters']:>7} {pl['micro_batch']:>4} {pl['flops']:>10.3e} {hours:>6.2f}"
            )
        print(f"total {total:.2f} GPU hours at {a.assumed_tflops:g} TFLOP/s achieved")
        if data.get("tokens"):
            worst = max(pl["tokens"] for pl in plans)
            print(
                f"corpus {data['tokens']:,} tokens: the largest rung reads it {worst / data['tokens']:.1f} times"
            )
        return 0

    # SIGTERM/SIGUSR1 (Slurm's time limit, preemption): the running rung saves and stops (the
    # trainer's own handlers), and no further rung starts.
    stop: list = []

    def watch_signals() -> None:  # (again after each rung: its trainer installs its own)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda signum, _f: stop.append(signum))

    watch_signals()
    if not a.report_only and a.jobs > 1 and a.rung is None:
        # the children plan with this run's per-rung memory, not a whole card each
        child_argv = [*raw_argv, "--rung-memory-gib", f"{cfg.rung_memory_gib}"]
        if cfg.rung_memory_gib is None:
            child_argv = raw_argv
        failed = run_parallel(selected, a.out, child_argv, a.jobs, deadline, stop)
        report(cfg, plans, a.out, bootstrap=a.bootstrap)
        print(open(os.path.join(a.out, "scaling_ladder.md")).read())
        if failed:
            print(f"[ladder] failed: {', '.join(failed)} (their logs: rungs/<name>.stdout)")
            return 1
        return 4 if selected_pending() else 0
    if not a.report_only:
        todo = selected
        if a.rung is not None:
            todo = [pl for i, pl in enumerate(plans) if a.rung in (str(i), pl["name"])]
            if not todo:
                p.error(f"--rung {a.rung}: no such rung (0..{len(plans) - 1} or a name)")
        for pl in todo:
            if os.path.isfile(os.path.join(a.out, "rungs", pl["name"] + ".json")):
                print(f"[ladder] {pl['name']}: done")
                continue
            if deadline is not None and time.time() > deadline - 30:
                print(f"[ladder] time limit: {pl['name']} not started")
                break
            print(
                f"[ladder] {pl['name']}: {pl['params'] / 1e6:.2f}M params, {pl['train_iters']} steps",
                flush=True,
            )
            if stop:
                print(f"[ladder] stopped by signal {stop[0]}: {pl['name']} not started")
                break
            res = L.run_rung(pl, a.out, deadline, stop_flag=stop)
            watch_signals()
            if res is None:  # --exit-interval: the next rung; time limit or a signal: stop here
                if cfg.exit_interval and not stop and not (deadline and time.time() >= deadline):
                    continue
                break
            print(f"[ladder] {pl['name']}: validation loss {res['val_loss']:.4f}", flush=True)
        if a.rung is not None:  # an array task: its rung only; --report-only fits them all
            done = all(
                os.path.isfile(os.path.join(a.out, "rungs", pl["name"] + ".json")) for pl in todo
            )
            return 0 if done else 4
    doc = report(cfg, plans, a.out, bootstrap=a.bootstrap)
    print(open(os.path.join(a.out, "scaling_ladder.md")).read())
    if a.report_only:
        return 4 if doc["pending"] else 0
    return 4 if selected_pending() else 0


def _rung_memory_gib(jobs: int) -> float | None:
    """The visible card's memory over the rungs that share it; None without a GPU."""
    import torch

    from megatron_hybrid.training.memory import device_memory_gib

    cap = device_memory_gib()
    if cap is None:
        return None
    gpus = max(torch.cuda.device_count(), 1)
    return cap / -(-jobs // gpus)


def _child_argv(raw: list[str], name: str, remaining: float | None) -> list[str]:
    """This command line for one rung: without --jobs / --time-limit / --only, with --rung NAME
    and the time left."""
    out, skip = [], False
    for arg in raw:
        if skip:
            skip = False
            continue
        if arg in ("--jobs", "--time-limit", "--only"):
            skip = True
            continue
        if arg.startswith(("--jobs=", "--time-limit=", "--only=")):
            continue
        out.append(arg)
    out += ["--rung", name]
    if remaining is not None:
        out += ["--time-limit", f"{remaining:.0f}"]
    return out


def run_parallel(plans, out: str, raw_argv: list[str], jobs: int, deadline, stop) -> list[str]:
    """Train the pending rungs ``jobs`` at a time, each a ``--rung`` child process (its own
    process group and port; output in rungs/<name>.stdout), largest first so the longest rung
    does not start last. A signal stops new starts and is passed on to the running rungs,
    which save. Returns the rungs whose process failed."""
    import torch

    from megatron_hybrid.parallel.child_env import without_rendezvous

    gpus = torch.cuda.device_count()
    pending = [
        pl
        for pl in sorted(plans, key=lambda pl: -pl["flops"])
        if not os.path.isfile(os.path.join(out, "rungs", pl["name"] + ".json"))
    ]
    running: dict[str, tuple[subprocess.Popen, int]] = {}  # name -> (process, slot)
    failed: list[str] = []
    forwarded = False
    while pending or running:
        free = sorted(set(range(jobs)) - {slot for _, slot in running.values()})
        while pending and free and not stop:
            remaining = None if deadline is None else deadline - time.time()
            if remaining is not None and remaining < 30:
                print(f"[ladder] time limit: {len(pending)} rungs not started")
                pending = []
                break
            pl, slot = pending.pop(0), free.pop(0)
            env = without_rendezvous(os.environ)
            if gpus > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            with open(os.path.join(out, "rungs", pl["name"] + ".stdout"), "a") as log:
                proc = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__),
                     *_child_argv(raw_argv, pl["name"], remaining)],
                    stdout=log, stderr=subprocess.STDOUT, env=env,
                )  # fmt: skip
            running[pl["name"]] = (proc, slot)
            print(f"[ladder] {pl['name']}: started (slot {slot})", flush=True)
        if stop and not forwarded:
            for proc, _ in running.values():
                proc.send_signal(stop[0])
            forwarded, pending = True, []
        for name, (proc, _) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[name]
            state = {0: "done", 4: "stopped (saved; rerun resumes)"}.get(rc, f"FAILED (exit {rc})")
            print(f"[ladder] {name}: {state}", flush=True)
            if rc not in (0, 4):
                failed.append(name)
        time.sleep(0.5)
    return failed


if __name__ == "__main__":
    sys.exit(main())
