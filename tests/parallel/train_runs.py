"""``python -m tests.parallel.fuzz_train <trainer flags> [--then <trainer flags> ...]``: the real
trainer (``megatron_hybrid.train``) with ``--mock-data`` rows replaced by the fuzzed document
layouts of ``tests/parallel/document_fuzz.py`` (seeded by ``--seed``). Used by test_cp_fuzz.py.

Runs separated by ``--then`` train one after another in the same processes (one launch: the
interpreter, torch/megatron imports and the default process group are paid once). Each run is
the trainer's ``main`` as it is, with its own model-parallel groups, model, optimizer and data;
only the default (world) process group outlives a run. Every rank prints ``FUZZ RUN <i>`` before
run ``i``, between two barriers: everything any rank prints for run ``i`` comes after all of
them and before any ``FUZZ RUN <i+1>``. ``--debug-detail`` at the start of a run's flags: the
process groups that run creates check every collective's type and shapes across ranks before
running it (what TORCH_DISTRIBUTED_DEBUG=DETAIL does for a whole process; the world group is
checked from then on too).
"""

from __future__ import annotations

import sys

from megatron_hybrid.data import batches
from tests.parallel.document_fuzz import FuzzDocumentsDataset

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
    return f"FUZZ RUN {i}"


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    from megatron_hybrid import mcore
    from megatron_hybrid.parallel import state
    from megatron_hybrid.train import main as train_main

    batches.MockDataset = FuzzDocumentsDataset  # what build_datasets makes for --mock-data
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
