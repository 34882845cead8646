"""End-to-end training runs on CPU (gloo): resume, crash-safe saves, NaN handling, real data,
data errors, TensorBoard, TP/DP layouts and checkpoint resharding."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import (
    ROOT,
    TINY_MOCK,
    concurrently,
    free_port,
    parse_losses,
    run_python,
    train_cmd,
)
from tests.parallel import train_runs

ITERS = ["--train-iters", "6"]


@pytest.fixture(scope="module")
def reference():
    proc = run_python(train_cmd(*TINY_MOCK, *ITERS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = parse_losses(proc.stdout)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    return losses


DP2_DISTOPT = ["--use-distributed-optimizer"]
TWO_RANK_LAYOUTS = [
    DP2_DISTOPT,
    ["--tensor-model-parallel-size", "2"],
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
]


@pytest.fixture(scope="module")
def two_rank_runs():
    """The 2-rank runs of TWO_RANK_LAYOUTS in one launch (tests/parallel/train_runs.py; the
    first, DP 2, in fresh processes like the trainer's own launch): the launch's process and
    layout -> a function giving that run's output (asserting the launch succeeded)."""
    proc, output = train_runs.launch(
        [[*TINY_MOCK, *ITERS, *layout] for layout in TWO_RANK_LAYOUTS], nproc=2, timeout=300
    )
    return proc, {
        tuple(layout): functools.partial(output, i) for i, layout in enumerate(TWO_RANK_LAYOUTS)
    }


@pytest.mark.parametrize("layout", TWO_RANK_LAYOUTS[1:] + TWO_RANK_LAYOUTS[:1])
def test_tp_and_dp_reproduce_single_rank(reference, two_rank_runs, layout):
    got = parse_losses(two_rank_runs[1][tuple(layout)]())
    for it, (loss, gnorm) in reference.items():
        assert got[it][0] == pytest.approx(loss, rel=2e-4), (it, got[it], loss)
        assert got[it][1] == pytest.approx(gnorm, rel=2e-3), (it, got[it], gnorm)


def test_sigkill_and_resume_is_bitwise(reference, two_rank_runs, tmp_path):
    save = str(tmp_path / "ckpt")
    args = train_cmd(*TINY_MOCK, *ITERS, "--save", save, "--load", save, "--save-interval", "3")
    # The job SIGKILLs its own process group (torchrun + both ranks) right after iteration 4 is
    # logged: a hard crash at a known point, no cleanup, no final save.
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", MEGATRON_HYBRID_FAULT="sigkill_at:4")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, start_new_session=True
    )
    # torchrun puts workers in their own process group: rank 0 dies by SIGKILL, torchrun reports it
    # and tears the job down.
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-2000:]
    assert "saved checkpoint at iteration 3" in proc.stdout
    assert "iteration        5/" not in proc.stdout
    resumed = run_python(args, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at iteration 3" in resumed.stdout
    got = parse_losses(resumed.stdout)
    assert sorted(got) == [4, 5, 6]
    # the uninterrupted DP 2 run: test_tp_and_dp_reproduce_single_rank's (the same command)
    dp2, outputs = two_rank_runs
    uninterrupted = (
        parse_losses(outputs[tuple(DP2_DISTOPT)]()) if dp2.returncode == 0 else reference
    )
    for it in (4, 5, 6):
        assert got[it] == uninterrupted[it], (it, got[it], uninterrupted[it])
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "6"
    cfg = json.load(open(os.path.join(save, "iter_0000006", "run_config.json")))
    assert cfg["model"]["hidden_size"] == 96 and cfg["train"]["train_iters"] == 6


def test_crash_during_save_keeps_previous_checkpoint(reference, tmp_path):
    save = str(tmp_path / "ckpt")
    args = train_cmd(
        *TINY_MOCK, *ITERS, "--save", save, "--load", save, "--save-interval", "2",
        "--keep-last-checkpoints", "1",
    )  # fmt: skip
    env_fault = dict(os.environ, MEGATRON_HYBRID_FAULT="crash_in_save:4")
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env_fault,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "2"
    assert os.path.isdir(os.path.join(save, "iter_0000002"))
    assert not os.path.exists(os.path.join(save, "iter_0000004"))
    resumed = run_python(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = parse_losses(resumed.stdout)
    assert sorted(got) == [3, 4, 5, 6]
    for it in got:
        assert got[it] == reference[it]
    # --keep-last-checkpoints 1: each new save removed the one before, after publishing
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == ["iter_0000006"]


def test_nan_steps_are_skipped_counted_and_stop_the_run():
    def run(fault: str, *args: str) -> subprocess.CompletedProcess:
        # one thread each: two processes on the CI machine's two cores (OpenMP threads beyond
        # the cores spin-wait and make both runs several times slower)
        env = dict(
            os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", MEGATRON_HYBRID_FAULT=fault
        )
        return subprocess.run(
            [sys.executable, *train_cmd(*TINY_MOCK, *args)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    # the two runs are independent: at the same time (one core each)
    proc, stopped = concurrently(
        lambda: run("nan_loss:2", "--train-iters", "4"),
        lambda: run("nan_loss:2,3,4", "--train-iters", "6", "train.max_consecutive_nan=3"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if "iteration " in ln]
    assert "number of nan iterations:   1" in lines[1] and "lm loss: NAN" in lines[1]
    assert "number of nan iterations:   1" in lines[3] and "lm loss: NAN" not in lines[3]
    assert stopped.returncode == 3, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "3 consecutive iterations with NaN/inf" in stopped.stderr


def test_reshard_tp2_checkpoint_loads_at_tp1(reference, tmp_path):
    save = str(tmp_path / "ckpt")
    first = run_python(
        train_cmd(
            *TINY_MOCK,
            *ITERS,
            "--exit-interval",
            "3",
            "--tensor-model-parallel-size",
            "2",
            "--save",
            save,
        ),
        nproc=2,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_python(train_cmd(*TINY_MOCK, *ITERS, "--load", save))
    assert second.returncode == 0, second.stderr[-3000:]
    got = parse_losses(second.stdout)
    for it in (4, 5, 6):
        assert got[it][0] == pytest.approx(reference[it][0], rel=2e-4)


def test_tensorboard_and_eval(tmp_path):
    tb = tmp_path / "tb"
    proc = run_python(
        train_cmd(
            *TINY_MOCK,
            "--train-iters",
            "2",
            "--eval-interval",
            "2",
            "--eval-iters",
            "1",
            "--tensorboard-dir",
            str(tb),
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation loss at iteration 2 | lm loss value:" in proc.stdout
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb))
