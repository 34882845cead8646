"""``python -m tests.parallel.train_runs <trainer flags> [--then <trainer flags> ...]``: several
runs of the real trainer (``megatron_hybrid.train``) in one launch (test_layouts.py and, through
fuzz_train.py, test_cp_fuzz.py; ``launch`` starts one and splits its output by run).

Runs separated by ``--then`` train one after another in the same processes (one launch: the
interpreter, torch/megatron imports and the default process group are paid once). Each run is
the trainer's ``main`` as it is, with its own model-parallel groups, model, optimizer and data;
only the default (world) process group outlives a run. Every rank prints ``TRAIN RUN <i>`` before
run ``i``, between two barriers: everything any rank prints for run ``i`` comes after all of
them and before any ``TRAIN RUN <i+1>``. ``--debug-detail`` at the start of a run's flags: the
process groups that run creates check every collective's type and shapes across ranks before
running it (what TORCH_DISTRIBUTED_DEBUG=DETAIL does for a whole process; the world group is
checked from then on too).
"""

from __future__ import annotations

import sys

SEPARATOR, DETAIL = "--then", "--debug-detail"


def split_runs(argv: list[str]) -> list[list[str]]:
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == SEPARATOR:
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


def marker(i: int) -> str:
    return f"TRAIN RUN {i}"


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    from megatron_hybrid import mcore
    from megatron_hybrid.parallel import state
    from megatron_hybrid.train import main as train_main

    destroy = state.destroy

    def destroy_model_parallel() -> None:  # what train_main calls at its end: keep the world
        if mcore.parallel_state.model_parallel_is_initialized():
            mcore.parallel_state.destroy_model_parallel()

    state.destroy = destroy_model_parallel
    try:
        for i, args in enumerate(split_runs(argv)):
            detail = bool(args) and args[0] == DETAIL
            dist.set_debug_level(dist.DebugLevel.DETAIL if detail else dist.DebugLevel.OFF)
            if dist.is_initialized():
                dist.barrier()
            print(marker(i), flush=True)
            if dist.is_initialized():
                dist.barrier()
            rc = train_main(args[1:] if detail else args)
            if rc:
                return rc
    finally:
        state.destroy = destroy
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def launch(runs: list[list[str]], nproc: int, module: str = __name__, timeout: int = 900):
    """``python -m <module>`` (this runner, or one that patches the trainer first) with the
    ``runs`` (trainer flags each; ``[DETAIL, ...]`` for a checked one) on ``nproc`` ranks:
    the process and a function ``output(i)`` that asserts the launch succeeded and returns what
    was printed for run ``i``."""
    from tests.conftest import run_python

    argv = ["-m", module]
    for i, args in enumerate(runs):
        argv += [SEPARATOR] * bool(i) + list(args)
    proc = run_python(argv, nproc=nproc, timeout=timeout)

    def output(i: int) -> str:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc.stdout.split(marker(i), 1)[1].split(marker(i + 1), 1)[0]

    return proc, output
