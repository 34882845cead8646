"""Context parallelism is correct for any documents: every CP layout reproduces the 1-rank run
over seeded, fuzzed document layouts (tests/parallel/document_fuzz.py), and every collective is
issued in the same order on every rank (one run with TORCH_DISTRIBUTED_DEBUG=DETAIL's check of
each collective's type and shapes across ranks before running it).

The runs of one world size share one launch (tests/parallel/train_runs.py ``--then``): the
startup of a 4-rank launch on 2 CPU cores costs as much as a few training steps.

Why: the GDN mixer's two CP all-gathers once had backward all-reduces whose order followed the
autograd graph, and that graph depends on where documents start on each rank; a batch whose
ranks saw different layouts aborted (gloo) or would hang / sum wrong tensors (NCCL). The
layout tests' mock rows did not trigger it; these rows are built to (docs/parallelism.md).
"""

from __future__ import annotations

import functools

import pytest

from tests.conftest import parse_losses
from tests.parallel import train_runs
from tests.parallel.document_fuzz import FuzzDocumentsDataset, row_features
from tests.parallel.test_layouts import grad_norms
from tests.parallel.train_runs import DETAIL

SEQ, GBS, ITERS = 32, 16, 3  # 48 rows per layout and seed; CP 4 chunks of 4 tokens (halo 3)
SEEDS = (11, 12)
REL = 2e-4
TP, PP, CP = (
    "--tensor-model-parallel-size",
    "--pipeline-model-parallel-size",
    "--context-parallel-size",
)
LAYOUTS = {
    "cp2": (2, [CP, "2"]),
    "cp4": (4, [CP, "4"]),
    "tp2_sp_cp2": (4, [TP, "2", "--sequence-parallel", CP, "2"]),
    "pp2_cp2": (4, [PP, "2", CP, "2"]),
}
# (layout, seed) pairs: each layout sees one seed, the cheap CP 2 both
CASES = [("cp2", 11), ("cp2", 12), ("cp4", 12), ("tp2_sp_cp2", 11), ("pp2_cp2", 12)]


def fuzz_args(seed: int, tb) -> list[str]:
    return [
        "--preset", "tiny", "--mock-data", "--deterministic",
        "--seed", str(seed), "--seq-length", str(SEQ), "--micro-batch-size", "1",
        "--global-batch-size", str(GBS), "--train-iters", str(ITERS), "--log-interval", "1",
        "--lr", "1e-3", "--lr-warmup-iters", "1", "--tensorboard-dir", str(tb),
    ]  # fmt: skip


def launch(tmp, nproc: int, runs: list[tuple[str, int, list[str], bool]]) -> dict:
    """One launch (``nproc`` ranks) of tests/parallel/fuzz_train.py training ``runs`` (name,
    seed, layout flags, check every collective) one after another: (name, seed) -> a function
    that asserts the launch succeeded and returns that run's (lm loss, grad norm) by iteration.
    """
    argvs = [
        [DETAIL] * detail + fuzz_args(seed, tmp / f"{name}-{seed}") + list(extra)
        for name, seed, extra, detail in runs
    ]
    _, output = train_runs.launch(argvs, nproc, module="tests.parallel.fuzz_train")

    def result(i: int, name: str, seed: int):
        out = output(i)
        losses = {it: loss for it, (loss, _) in parse_losses(out).items()}
        assert sorted(losses) == list(range(1, ITERS + 1)), (name, seed, out[-2000:])
        return losses, grad_norms(tmp / f"{name}-{seed}")

    return {
        (name, seed): functools.partial(result, i, name, seed)
        for i, (name, seed, _, _) in enumerate(runs)
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every run of this module, one launch per world size (1: the references of both seeds; 2;
    4): (name, seed) -> its result function (``launch``); the 1-rank references as ("ref",
    seed). The first CP 2 case also checks every collective's type and shape across ranks."""
    tmp = tmp_path_factory.mktemp("fuzz")
    runs: dict[int, list] = {1: [("ref", seed, [], False) for seed in SEEDS]}
    for name, seed in CASES:
        nproc, args = LAYOUTS[name]
        runs.setdefault(nproc, []).append((name, seed, args, (name, seed) == CASES[0]))
    return {k: v for nproc, r in runs.items() for k, v in launch(tmp, nproc, r).items()}


def chunk_facts(starts: list[int], n: int, cp: int) -> dict[str, bool]:
    L = n // (2 * cp)
    inside = [s for s in starts if s]
    ranks_without = [
        r
        for r in range(cp)
        if not any(
            j * L < s < (j + 1) * L or s == j * L for s in inside for j in (r, 2 * cp - 1 - r)
        )
    ]
    return {
        "start at a chunk start": any(s % L == 0 for s in inside),
        "start inside a conv halo": any(0 < s % L <= 3 for s in inside),
        "one-token document": any(b - a == 1 for a, b in zip(starts, starts[1:] + [n])),
        "a rank without a boundary": bool(ranks_without),
        "one document over every rank": starts == [0],
        "EOD-only row": len(starts) == n,
    }


def test_fuzz_rows_cover_the_corner_cases():
    """The rows the runs below train on contain every corner case at CP 2 and CP 4."""
    from megatron_hybrid.data.batches import collate

    vocab, eod = 512, 511
    for cp in (2, 4):
        seen: dict[str, int] = {}
        for seed in SEEDS:
            ds = FuzzDocumentsDataset(ITERS * GBS, SEQ, vocab, eod, seed)
            for i in range(len(ds)):
                starts = collate([ds[i]], eod, True)["cu_seqlens"].tolist()[:-1]
                for what, yes in chunk_facts(starts, SEQ, cp).items():
                    seen[what] = seen.get(what, 0) + int(yes)
        assert all(seen.get(k, 0) >= 2 for k in chunk_facts([0], SEQ, cp)), (cp, seen)
    assert len({tuple(row_features(i, s)) for s in SEEDS for i in range(ITERS * GBS)}) > 20


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_cp_layout_reproduces_single_rank_on_fuzzed_documents(trained, name, seed):
    loss, gnorm = trained[name, seed]()
    ref_loss, ref_gnorm = trained["ref", seed]()
    for it in range(1, ITERS + 1):
        assert loss[it] == pytest.approx(ref_loss[it], rel=REL), ("lm loss", it, loss, ref_loss)
        assert gnorm[it] == pytest.approx(ref_gnorm[it], rel=REL), ("grad", it, gnorm, ref_gnorm)
