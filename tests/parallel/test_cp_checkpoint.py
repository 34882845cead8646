"""Checkpoints under context parallelism (CPU, gloo, tiny preset, mock data, --deterministic).

A CP run saved mid-way and resumed at the same layout continues exactly like the uninterrupted
run (same lm loss and grad norm at every later iteration, as printed); a CP checkpoint loaded
at another layout (CP 1; TP 1 from TP 2 x CP 2) continues like the uninterrupted run within the
layout tolerance of tests/parallel/test_layouts.py (2e-4 relative). The checkpoint has no CP
dimension: weights are sharded by TP/PP only and CP ranks hold replicas (DP x CP), so nothing in
it depends on the CP size.
"""

from __future__ import annotations

import pytest

from tests.conftest import TINY_MOCK, concurrently, parse_losses, run_python, train_cmd

# 4 iterations of 2 rows (TINY_MOCK's global batch 4 halved: a 4-rank TP 2 x CP 2 step costs
# ~0.5 s per micro-batch on 2 CPU cores), saved after 2: two iterations continue from the
# checkpoint, which the resumed runs must reproduce.
N_ITERS, SAVED_AT = 4, 2
ITERS = ["--train-iters", str(N_ITERS), "--global-batch-size", "2"]
AFTER = list(range(SAVED_AT + 1, N_ITERS + 1))
REL = 2e-4
CP2 = ["--context-parallel-size", "2"]
TP2_CP2 = ["--tensor-model-parallel-size", "2", *CP2]


def train(args: list[str], nproc: int) -> tuple[dict, str]:
    proc = run_python(train_cmd(*TINY_MOCK, *ITERS, *args), nproc=nproc, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return parse_losses(proc.stdout), proc.stdout


def train_saving(tmp_path, layout: list[str], nproc: int) -> tuple[dict, str]:
    """The uninterrupted run, saving at SAVED_AT on the way: its losses and that checkpoint
    (an ``iter_N`` directory, which ``--load`` takes as it is)."""
    ckpt = tmp_path / "ckpt"
    losses, _ = train([*layout, "--save", str(ckpt), "--save-interval", str(SAVED_AT)], nproc)
    assert sorted(losses) == list(range(1, N_ITERS + 1)), losses
    return losses, str(ckpt / f"iter_{SAVED_AT:07d}")


def resume_exactly(tmp_path, layout: list[str], nproc: int, uninterrupted: dict, ckpt: str):
    """Resumed at the same layout from SAVED_AT (saving elsewhere), the iterations after it equal
    ``uninterrupted`` bitwise (which also shows saving did not disturb that run)."""
    resumed, out = train([*layout, "--load", ckpt, "--save", str(tmp_path / "again")], nproc)
    assert f"at iteration {SAVED_AT}" in out and "resumed from" in out, out[-2000:]
    assert sorted(resumed) == AFTER, resumed
    for it in resumed:
        assert resumed[it] == uninterrupted[it], (it, resumed[it], uninterrupted[it])


def assert_continues_like(got: dict, ref: dict) -> None:
    assert sorted(got) == AFTER, got
    for it in got:
        assert got[it][0] == pytest.approx(ref[it][0], rel=REL), ("lm loss", it, got, ref)
        assert got[it][1] == pytest.approx(ref[it][1], rel=2e-3), ("grad norm", it, got, ref)


def test_cp2_checkpoint_resumes_exactly_and_loads_at_cp1(tmp_path):
    uninterrupted, ckpt = train_saving(tmp_path, CP2, nproc=2)
    resume_exactly(tmp_path, CP2, 2, uninterrupted, ckpt)
    at_cp1, out = train(["--load", ckpt], nproc=1)
    assert f"at iteration {SAVED_AT}" in out
    assert_continues_like(at_cp1, uninterrupted)


def test_tp2_cp2_checkpoint_resumes_exactly_and_loads_at_one_rank(tmp_path):
    uninterrupted, ckpt = train_saving(tmp_path, TP2_CP2, nproc=4)
    resume_exactly(tmp_path, TP2_CP2, 4, uninterrupted, ckpt)
    one_rank, _ = train(["--load", ckpt], nproc=1)  # TP and CP both change
    assert_continues_like(one_rank, uninterrupted)


DP2_DISTOPT = ["--use-distributed-optimizer"]


def test_dp2_distributed_optimizer_resumes_exactly_and_loads_at_one_rank(tmp_path):
    # megatron-core's torch-Adam path of the distributed optimizer (no TE/apex: CPU runs) needs
    # mcore.fix_torch_adam_distributed_optimizer to save/load at all and to resume exactly
    uninterrupted, ckpt = train_saving(tmp_path, DP2_DISTOPT, nproc=2)
    resume_exactly(tmp_path, DP2_DISTOPT, 2, uninterrupted, ckpt)
    # the three 1-rank runs below are independent: at the same time (one core each)
    (one_rank, _), proc, (fresh, _) = concurrently(
        lambda: train(["--load", ckpt, *DP2_DISTOPT], nproc=1),
        lambda: run_python(train_cmd(*TINY_MOCK, *ITERS, "--load", ckpt), timeout=300),
        lambda: train(["--load", ckpt, "--no-load-optim"], nproc=1),
    )
    assert_continues_like(one_rank, uninterrupted)
    # the plain optimizer cannot read distributed-optimizer states: a clear refusal, and
    # --no-load-optim takes the weights (the first resumed iteration's loss is computed before
    # any update)
    assert proc.returncode != 0 and "--no-load-optim" in proc.stdout + proc.stderr
    first = SAVED_AT + 1
    assert fresh[first][0] == pytest.approx(uninterrupted[first][0], rel=REL)
