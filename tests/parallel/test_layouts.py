"""Every parallel layout trains exactly like one rank (CPU, gloo), incl. context parallelism.

Each layout runs the tiny model on mock data (documents separated by EOD, so document starts
fall inside and exactly at CP chunk boundaries: checked below) and its ``lm loss`` and grad norm
at every iteration must equal the 1-rank run's within 2e-4 relative. The grad norm is read at
full precision from TensorBoard (the log line prints 3 decimals). Also: the GDN mixer and core
attention under CP 2 and 4 against the 1-rank layers (tests/parallel/cp_check.py), and
impossible CP layouts rejected before any process group or model exists.
"""

from __future__ import annotations

import functools
import glob
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY_MOCK, concurrently, parse_losses, run_python, train_cmd
from tests.parallel import train_runs

SEQ, GBS, ITERS = 64, 4, 4
BASE = TINY_MOCK  # seq 64, global batch 4, micro-batch 1, --deterministic
REL = 2e-4


def grad_norms(tb_dir) -> dict[int, float]:
    """iteration -> grad norm (float32, as logged to TensorBoard)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = {}
    for path in glob.glob(os.path.join(tb_dir, "events.out.tfevents*")):
        for ev in EventFileLoader(path).Load():
            for v in ev.summary.value:
                if v.tag == "grad-norm":
                    out[ev.step] = (
                        v.simple_value if v.HasField("simple_value") else v.tensor.float_val[0]
                    )
    return out


def train_args(tb, args: list[str], iters: int = ITERS) -> list[str]:
    return [*BASE, "--train-iters", str(iters), "--tensorboard-dir", str(tb), *args]


def results(stdout: str, tb, iters: int = ITERS):
    """(lm loss by iteration, grad norm by iteration) of one run: its output and TensorBoard."""
    losses = {it: loss for it, (loss, _) in parse_losses(stdout).items()}
    assert sorted(losses) == list(range(1, iters + 1)), stdout[-2000:]
    return losses, grad_norms(tb)


def train(tmp_path, name: str, args: list[str], nproc: int, iters: int = ITERS):
    """(lm loss by iteration, grad norm by iteration) of one training run."""
    tb = tmp_path / name
    proc = run_python(train_cmd(*train_args(tb, args, iters)), nproc=nproc, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return results(proc.stdout, tb, iters)


def assert_same(got, ref, iters: int = ITERS):
    (loss, gnorm), (ref_loss, ref_gnorm) = got, ref
    for it in range(1, iters + 1):
        assert loss[it] == pytest.approx(ref_loss[it], rel=REL), ("lm loss", it, loss, ref_loss)
        assert gnorm[it] == pytest.approx(ref_gnorm[it], rel=REL), (
            "grad norm",
            it,
            gnorm,
            ref_gnorm,
        )


def _run_results(output, i: int, tb):
    return results(output(i), tb)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every run below but the 8-rank one, the runs of one world size in one launch
    (tests/parallel/train_runs.py: the startup of a launch on 2 CPU cores costs as much as a
    few steps): name -> a function that asserts its launch succeeded and returns its
    ``results``. The 1-rank references: "ref" and "ref_nodoc"."""
    tmp = tmp_path_factory.mktemp("layouts")
    runs: dict[int, list] = {1: [("ref", []), ("ref_nodoc", NODOC)]}
    for name, (nproc, args) in LAYOUTS.items():
        runs.setdefault(nproc, []).append((name, args))
    runs[2].append(("cp2_nodoc", [*NODOC, CP, "2"]))
    out = {}
    for nproc, named in runs.items():
        _, output = train_runs.launch(
            [train_args(tmp / name, args) for name, args in named], nproc, timeout=600
        )
        for i, (name, _) in enumerate(named):
            out[name] = functools.partial(_run_results, output, i, tmp / name)
    return out


@pytest.fixture(scope="module")
def reference(trained):
    return trained["ref"]()


def test_mock_documents_cross_cp_chunks():
    """The runs below see documents that continue across CP chunks, starts inside chunks and a
    start exactly at a chunk (CP 4), so the GDN state passing and the conv halo are exercised."""
    from megatron_hybrid.data.batches import MockDataset, collate

    vocab, eod = 512, 511  # tiny preset, no tokenizer: EOD is the last id
    ds = MockDataset(ITERS * GBS, SEQ, vocab, eod, seed=1234)
    rows = [collate([ds[i]], eod, True)["cu_seqlens"].tolist()[:-1] for i in range(len(ds))]
    for cp in (2, 4):
        L = SEQ // (2 * cp)
        continuing = sum(1 for starts in rows for j in range(1, 2 * cp) if j * L not in starts)
        inside = sum(1 for starts in rows for s in starts if s % L)
        assert continuing > 10 and inside > 10, (cp, continuing, inside)
    assert any(s and s % (SEQ // 8) == 0 for starts in rows for s in starts)  # CP 4 chunk start


@pytest.mark.parametrize("nproc", [2, 4])
def test_gdn_and_attention_cp_match_one_rank(nproc):
    proc = run_python(["-m", "tests.parallel.cp_check"], nproc=nproc, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"CP CHECK OK {nproc}" in proc.stdout


TP, PP, CP = (
    "--tensor-model-parallel-size",
    "--pipeline-model-parallel-size",
    "--context-parallel-size",
)
LAYOUTS = {
    "tp2_sp": (2, [TP, "2", "--sequence-parallel"]),
    "pp2": (2, [PP, "2"]),
    "pp2_vp2": (2, [PP, "2", "--virtual-pipeline-model-parallel-size", "2"]),
    "cp2": (2, [CP, "2"]),
    "cp4": (4, [CP, "4"]),  # the tiny preset's 6 heads are not divisible by 4
    "dp2_distopt": (2, ["--use-distributed-optimizer"]),
    "tp2_cp2": (4, [TP, "2", CP, "2"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_reproduces_single_rank(trained, reference, name):
    assert_same(trained[name](), reference)


def test_tp2_pp2_cp2_eight_ranks(reference, tmp_path):
    args = [TP, "2", PP, "2", CP, "2", "--sequence-parallel"]
    assert_same(train(tmp_path, "tp2pp2cp2", args, nproc=8), reference)


NODOC = ["--no-document-masking", "--micro-batch-size", "2"]


def test_cp_without_document_masking_sequence_start_at_chunk(trained):
    """Two sequences per micro-batch, no document masking: the only reset is the second
    sequence's start, exactly at CP rank 1's second chunk (row 128, chunks of 32)."""
    assert_same(trained["cp2_nodoc"](), trained["ref_nodoc"]())


def run_rejected(args: list[str], world: int) -> subprocess.CompletedProcess:
    """One process that claims a world of ``world`` ranks: a layout check that passes would go on
    to wait for the other ranks, so the timeout also proves the rejection comes first."""
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", WORLD_SIZE=str(world))
    env.update(RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    return subprocess.run(
        [sys.executable, *train_cmd(*BASE, "--train-iters", "1", *args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


REJECTED = [
    (
        [CP, "4", "--seq-length", "60"],
        4,
        "micro_batch_size x seq_length = 1 x 60 = 60 is not divisible by 2 x CP = 2 x 4 = 8",
    ),
    ([CP, "2", "--spec", "te"], 2, "needs the local layer spec"),
    ([CP, "8", "--seq-length", "32"], 8, "chunks of 2 tokens"),
]


@pytest.fixture(scope="module")
def rejected_runs():
    """run_rejected of every REJECTED layout, all at the same time (independent 1-thread
    processes): (args, world) -> the finished process."""
    procs = concurrently(*(functools.partial(run_rejected, a, w) for a, w, _ in REJECTED))
    return {(tuple(a), w): proc for (a, w, _), proc in zip(REJECTED, procs)}


@pytest.mark.parametrize("args, world, message", REJECTED)
def test_impossible_cp_layout_is_rejected_first(rejected_runs, args, world, message):
    proc = rejected_runs[tuple(args), world]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "iteration" not in proc.stdout
